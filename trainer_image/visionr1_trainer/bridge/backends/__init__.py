"""Generation backends of the bridge stage, behind one interface.

A ``Generator`` turns a list of ``Request``s (a prompt, optional images, the row's
extra fields) into one ``Completion`` each, in order. A failed request comes back as a
``Completion`` with ``error`` set, never as an exception, so one bad row cannot stop a
shard. ``retryable`` says whether the failure lies with the teacher (an endpoint down,
overloaded or refusing our key: the pipeline asks again on the next run and fails the
stage when too many fail) or with the request itself (too long, refused as malformed:
counted as a drop for good). ``finish_reason`` is the API's (``stop``, ``length``...):
a ``length`` completion was cut at the token budget and is never kept. Backends are
chosen by name from ``GENERATORS``:

* ``vllm``: offline engine on the stage's GPUs (tensor parallel);
* ``openai``: any OpenAI-compatible endpoint, bounded concurrency, retries with backoff;
* ``hf``: transformers on CPU or GPU;
* ``rule``: the rule-based teacher of the synthetic task family (demo and tests).
"""

from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

STEPS = ("pseudo_cot", "description", "reasoning")
# Where the openai backend finds its API key; the operator maps spec.*.apiKeySecret here.
API_KEY_ENV = {
    "multimodal": "VISIONR1_BRIDGE_MULTIMODAL_API_KEY",
    "reasoning": "VISIONR1_BRIDGE_REASONING_API_KEY",
}


@dataclass(frozen=True)
class Request:
    """One generation: ``step`` is one of ``STEPS``; ``meta`` holds the row's other fields."""

    key: str
    step: str
    prompt: str
    image_paths: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """A generated text; ``reasoning`` is a separate reasoning channel when the API has one
    (DeepSeek's ``reasoning_content``). ``text`` is None exactly when ``error`` is set.
    ``finish_reason`` is ``length`` when the budget cut the generation (None: unknown);
    ``retryable`` marks a failure of the teacher rather than of the request."""

    text: str | None
    reasoning: str | None = None
    error: str | None = None
    finish_reason: str | None = None
    retryable: bool = False

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class GeneratorContext:
    """What a backend needs besides its spec."""

    role: str  # multimodal | reasoning
    seed: int = 0
    storage: Any = None  # StorageSpec, to resolve model URIs (None: local paths and hub ids only)
    work_dir: Path = Path("/tmp/visionr1")


    def storage_spec(self):
        from ...config import StorageSpec

        return self.storage if self.storage is not None else StorageSpec(uri="file:///")


Progress = Callable[[int], None] | None


class Generator(ABC):
    kind: str = ""

    @abstractmethod
    def generate(self, requests: Sequence[Request], progress: Progress = None) -> list[Completion]:
        """One completion per request, in order; ``progress(n)`` after each n finished."""

    def describe(self) -> dict[str, Any]:
        """What generated the data, for the data set's statistics."""
        return {"backend": self.kind}

    def outage(self) -> str | None:
        """Why the teacher is to be considered down (its circuit breaker opened), else None."""
        return None

    def close(self) -> None:
        """Free the model/engine (a vLLM engine holds its GPUs until then)."""


GENERATORS: dict[str, Callable[[Any, GeneratorContext], Generator]] = {}


def register(name: str):
    def wrap(factory):
        GENERATORS[name] = factory
        return factory
    return wrap


def make_generator(spec, ctx: GeneratorContext) -> Generator:
    """The backend ``spec.backend`` names (``GeneratorSpec``), built for ``ctx.role``."""
    _load_builtin()
    if spec.backend not in GENERATORS:
        raise ValueError(f"unknown generation backend {spec.backend!r}; valid: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[spec.backend](spec, ctx)


def _load_builtin() -> None:
    # Each module registers itself; none imports torch or vllm at module level.
    from . import hf, openai_api, rule, vllm_engine  # noqa: F401


def image_data_url(path: str) -> str:
    """An image file as a ``data:`` URL (what OpenAI-style chat APIs and vLLM's chat take)."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "PNG").lower()
    mime = {"jpg": "jpeg", "mpo": "jpeg"}.get(fmt, fmt)
    return f"data:image/{mime};base64,{base64.b64encode(data).decode()}"


def chat_messages(prompt: str, image_paths: Sequence[str] = ()) -> list[dict[str, Any]]:
    """OpenAI chat messages for one request: images first, then the text.

    Text-only requests use a plain string (some text-only endpoints reject content lists).
    """
    if not image_paths:
        return [{"role": "user", "content": prompt}]
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in image_paths
    ]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


__all__ = [
    "API_KEY_ENV", "Completion", "GENERATORS", "Generator", "GeneratorContext", "Request", "STEPS",
    "chat_messages", "image_data_url", "make_generator", "register",
]
