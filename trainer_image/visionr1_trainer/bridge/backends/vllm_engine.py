"""The ``vllm`` backend: an offline vLLM engine on the stage's GPUs, tensor parallel.

vLLM is imported only when this backend is built (it is in the trainer image's ``gpu``
extra, not on CPU machines). Requests go through ``LLM.chat`` with the model's own chat
template and images as ``data:`` URLs, the same messages the ``openai`` backend sends.
The bridge pipeline runs every multimodal step before any reasoning step and closes the
multimodal engine first, so the MLLM and the reasoning model never share the GPUs.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

from . import Completion, Generator, GeneratorContext, Progress, Request, chat_messages, register

# Images per prompt vLLM reserves memory for; bridging prompts carry one image, a few at most.
MAX_IMAGES_PER_PROMPT = 4


def sampling_kwargs(spec, seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments for a ``GeneratorSpec``."""
    return {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens,
            "seed": seed, "n": 1}


def engine_kwargs(spec, source: str, role: str, seed: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments: tensor parallel over the stage's GPUs, images for the MLLM."""
    kwargs: dict[str, Any] = {"model": source, "tensor_parallel_size": spec.tensor_parallel_size,
                              "seed": seed, "trust_remote_code": False}
    if role == "multimodal":
        kwargs["limit_mm_per_prompt"] = {"image": MAX_IMAGES_PER_PROMPT}
    return kwargs


def split_output(text: str, finish_reason: str | None = None) -> Completion:
    """A vLLM completion as a ``Completion`` (the reasoning stays inline, parsed later);
    ``finish_reason`` is vLLM's (``length`` when cut at ``max_tokens``)."""
    if not text.strip():
        return Completion(None, error="vllm_empty", finish_reason=finish_reason)
    return Completion(text, finish_reason=finish_reason)


class VLLMGenerator(Generator):
    kind = "vllm"

    def __init__(self, spec, ctx: GeneratorContext):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError(
                "the 'vllm' bridge backend needs vLLM, which this installation lacks "
                "(it is in the trainer image's gpu extra); use backend 'openai' against a "
                f"vLLM server or 'hf' instead ({exc})") from exc
        from ...checkpoint import resolve_model_dir

        self.spec, self.ctx = spec, ctx
        source = resolve_model_dir(spec.model, ctx.storage_spec(), ctx.work_dir)
        self.llm = LLM(**engine_kwargs(spec, source, ctx.role, ctx.seed))
        self.params = SamplingParams(**sampling_kwargs(spec, ctx.seed))

    def generate(self, requests: Sequence[Request], progress: Progress = None) -> list[Completion]:
        if not requests:
            return []
        conversations = [chat_messages(r.prompt, r.image_paths) for r in requests]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        if progress:
            progress(len(requests))
        return [split_output(o.outputs[0].text, getattr(o.outputs[0], "finish_reason", None))
                if o.outputs else Completion(None, error="vllm_empty")
                for o in outputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.spec.model,
                "tensor_parallel_size": self.spec.tensor_parallel_size,
                "max_tokens": self.spec.max_tokens, "temperature": self.spec.temperature,
                "top_p": self.spec.top_p}

    def close(self) -> None:
        self.llm = None
        release_vllm()


def release_vllm() -> None:
    """Free a dropped vLLM engine's tensor-parallel workers and GPU memory (for the next model)."""
    import torch

    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@register("vllm")
def _make(spec, ctx) -> VLLMGenerator:
    return VLLMGenerator(spec, ctx)
