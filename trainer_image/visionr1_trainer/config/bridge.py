"""The bridge stage's settings: its two generators, prompts and filters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from ..schema import (
    CelRule,
    HttpUrlNoCredentials,
    Schema,
    SourceNoCredentials,
    raise_problems,
)
from .sources import SecretKeyRef


Backend = Literal["vllm", "openai", "hf", "rule"]


class GeneratorSpec(Schema):
    """A model that generates text for the bridge stage, and how to reach it."""

    backend: Backend = Field(
        description=(
            "vllm: offline engine on the stage's GPUs; openai: any OpenAI-compatible "
            "endpoint; hf: transformers (CPU or GPU); rule: the rule-based teacher for "
            "the synthetic task family (local demo only)."
        ),
    )
    model: SourceNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="Model id or URI; for openai, the model name the endpoint serves.",
    )
    endpoint: HttpUrlNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="Base URL of the OpenAI-compatible API (openai backend only).",
    )
    api_key_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the API key (openai backend only).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="vLLM tensor parallel degree."
    )
    max_tokens: int = Field(
        default=16384, ge=1, le=1_048_576, description="Maximum new tokens per request."
    )
    temperature: float = Field(default=0.6, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling top_p.")
    concurrency: int = Field(
        default=16, ge=1, le=4096, description="Requests in flight (openai backend)."
    )
    timeout_seconds: float = Field(
        default=600.0, gt=0,
        description="openai backend: seconds to wait for the next streamed event (with stream), "
        "or for the whole answer plus maxTokens / 5 s (without).",
    )
    max_retries: int = Field(
        default=5, ge=0, le=100, description="Retries on 429, 5xx and timeouts, with backoff."
    )
    stream: bool = Field(
        default=True,
        description="openai backend: stream the answer (server-sent events), so a long chain of "
        "thought is not cut by a timeout; off for endpoints that cannot stream.",
    )
    circuit_breaker_failures: int = Field(
        default=20, ge=1, le=100_000,
        description="openai backend: after this many failed attempts in a row (connection "
        "errors, timeouts, 5xx) the endpoint is taken as down: waiting requests fail at once and "
        "the stage stops, naming the endpoint; failed requests are asked again on the next run.",
    )

    cel_rules = (
        CelRule(
            "self.backend != 'openai' || (has(self.endpoint) && has(self.model))",
            "endpoint and model are required when backend is 'openai'",
        ),
        CelRule(
            "!(self.backend in ['vllm', 'hf']) || has(self.model)",
            "model is required when backend is 'vllm' or 'hf'",
            ".model",
        ),
        CelRule(
            "self.backend == 'openai' || (!has(self.endpoint) && !has(self.apiKeySecret))",
            "endpoint and apiKeySecret are only used by the 'openai' backend",
        ),
    )

    @model_validator(mode="after")
    def _backend_fields(self) -> GeneratorSpec:
        problems = []
        if self.backend == "openai":
            if not self.endpoint:
                problems.append(("endpoint", "required when backend is 'openai'"))
            if not self.model:
                problems.append(("model", "required when backend is 'openai'"))
        elif self.backend in ("vllm", "hf") and not self.model:
            problems.append(("model", f"required when backend is '{self.backend}'"))
        if self.backend != "openai":
            for field in ("endpoint", "api_key_secret"):
                if getattr(self, field) is not None:
                    problems.append((to_camel(field), "only used by the 'openai' backend"))
        raise_problems(problems)
        return self


# Each custom prompt template is at most this long: the stage config travels in a
# ConfigMap (1 MiB at most), and three templates of 16 KiB leave room for everything else.
MAX_PROMPT_CHARS = 16384


class BridgePrompts(Schema):
    """Prompt templates of the three Modality Bridging steps (None = the paper's)."""

    pseudo_cot: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Step 1 (multimodal model): from {question} and {answer} with the image, "
        "write a pseudo chain of thought.",
    )
    description: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Step 2 (multimodal model): from {question} and {pseudo_cot} with the "
        "image, write a detailed text description of the image.",
    )
    reasoning: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Step 3 (text reasoning model): from {description} and {question}, "
        "reason step by step to the final answer.",
    )


class BridgeFilters(Schema):
    """Rule-based filters applied to generated samples; each drop is counted by reason."""

    answer_match: bool = Field(
        default=True, description="Keep only samples whose final answer matches the ground truth."
    )
    format: bool = Field(default=True, description="Require the <think>/<answer> output format.")
    min_reasoning_chars: int = Field(
        default=0, ge=0, description="Drop reasoning shorter than this many characters."
    )
    max_reasoning_chars: int = Field(
        default=60000, ge=1, description="Drop reasoning longer than this many characters."
    )
    max_repetition: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Drop a sample whose most repeated line/sentence makes up more than this "
        "fraction of its reasoning.",
    )
    dedupe: bool = Field(default=True, description="Drop duplicate (image, question) pairs.")

    cel_rules = (
        CelRule(
            "self.minReasoningChars <= self.maxReasoningChars",
            "minReasoningChars must not be above maxReasoningChars",
            ".minReasoningChars",
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> BridgeFilters:
        if self.min_reasoning_chars > self.max_reasoning_chars:
            raise_problems([(
                "minReasoningChars",
                f"{self.min_reasoning_chars} is above maxReasoningChars "
                f"({self.max_reasoning_chars})",
            )])
        return self


class BridgeSettings(Schema):
    """Modality Bridging: build the cold-start CoT data set."""

    multimodal_model: GeneratorSpec = Field(
        default_factory=lambda: GeneratorSpec.model_validate(
            {"backend": "vllm", "model": "Qwen/Qwen2.5-VL-72B-Instruct", "tensorParallelSize": 8}
        ),
        description="The MLLM that writes the pseudo-CoT and the detailed image description.",
    )
    reasoning_model: GeneratorSpec = Field(
        default_factory=lambda: GeneratorSpec.model_validate(
            {"backend": "vllm", "model": "deepseek-ai/DeepSeek-R1", "tensorParallelSize": 8}
        ),
        description="The text-only reasoning model (DeepSeek-R1 class) that writes the long CoT.",
    )
    prompts: BridgePrompts = Field(
        default_factory=BridgePrompts, description="Prompt overrides; unset means the paper's."
    )
    filters: BridgeFilters = Field(default_factory=BridgeFilters, description="Sample filters.")
    sample_limit: int | None = Field(
        default=None, ge=1, description="Process at most this many source rows."
    )
    shards: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Work units; progress is committed per shard, so a killed stage redoes at "
        "most one shard. Unset: as many shards as shardSize gives.",
    )
    shard_size: int = Field(
        default=64, ge=1, le=1_000_000,
        description="Rows per shard when shards is unset: 64 rows are a few minutes of teacher "
        "work at the default concurrency, which is what a kill costs.",
    )
    max_failure_rate: float = Field(
        default=0.01, ge=0, le=1,
        description="Share of rows whose teacher request may fail (endpoint down, 5xx, "
        "timeouts, after retries) before the stage fails, naming the endpoint and the error. "
        "Failed rows are committed as pending and asked again on the next run; under the "
        "bound, those still failing are dropped as generation_failed.",
    )
    seed: int = Field(default=0, ge=0, description="Sampling seed.")


# Sequences at least this long train with activation checkpointing under "auto": the
# paper's SFT cutoff (16K) and PTST budgets (4K, 8K) are; the tiny CPU demo's are not.
