"""Stage configs: the one schema both sides of the product share.

The operator (or the local executor) renders one of the ``*StageConfig`` models below
as JSON for each stage; the stage's entrypoint (``python -m visionr1_trainer <stage>
--config stage.json``) validates the same JSON with the same model. The settings
models (``SFTSettings``, ``GRPOSettings``...) are also what ``visionr1_operator.api``
composes into the ``VisionR1Run`` spec, so a field and its description live in one
place, and the CRD is generated from them.

Pydantic only: this module must import without torch (the operator imports it).
Field names are camelCase on the wire (the Kubernetes convention) and snake_case in
Python; unknown fields are errors, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

# The schema machinery and the shared patterns, re-exported: callers import them from here.
from .schema import (  # noqa: F401
    DNS_LABEL,
    DNS_SUBDOMAIN,
    HTTP_URL,
    HUB_ID,
    QUANTITY_PATTERN,
    SECRET_PREFIX,
    SOURCE,
    STORAGE_URI,
    WIRE,
    CelRule,
    FieldProblems,
    HttpUrlNoCredentials,
    Quantity,
    Schema,
    SourceNoCredentials,
    StorageUriNoCredentials,
    url_no_credentials,
    _no_secret_literal,
    format_errors,
    raise_problems,
)

class SecretKeyRef(Schema):
    """A key inside a Kubernetes Secret in the run's namespace."""

    name: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of the Secret (in the run's namespace).",
    )
    key: str = Field(
        default="token",
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret whose value is used.",
    )


class ModelSpec(Schema):
    """The model a stage starts from."""

    name: Annotated[SourceNoCredentials, AfterValidator(_no_secret_literal)] = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Base model: a hub id (Qwen/Qwen2.5-VL-7B-Instruct) or a storage URI "
            "(s3://, pvc://, file://) of a saved model directory."
        ),
    )
    revision: str | None = Field(
        default=None, max_length=255, description="Hub revision (branch, tag or commit)."
    )
    token_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a hub access token, exposed to stages as HF_TOKEN.",
    )
    processor: SourceNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="Processor/tokenizer source when it differs from the model's.",
    )
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        default="bfloat16", description="Weights dtype for training and generation."
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        default="sdpa", description="Attention kernel passed to transformers."
    )

    cel_rules = (
        CelRule(
            f"!self.name.matches('{SECRET_PREFIX}')",
            "name looks like a secret value; give the name of a Secret that holds it",
            ".name",
        ),
    )


class StorageSpec(Schema):
    """Where every stage's artifacts live: <uri>/<namespace>/<run>/<stage>/."""

    uri: StorageUriNoCredentials = Field(
        max_length=1024,
        description=(
            "Artifact root: s3://bucket/prefix, pvc://claim/path (mounted into every "
            "stage pod), or file:///path for local runs."
        ),
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description=(
            "Name of a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "optional AWS_SESSION_TOKEN) are given to stage pods as environment. "
            "Secret values are never accepted in the spec."
        ),
    )
    endpoint: HttpUrlNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, R2...).",
    )
    region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="S3 region."
    )

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]


class ConversationFields(Schema):
    """Where a conversation-only data set keeps a question and its answer."""

    field: str = Field(
        default="conversations", min_length=1, max_length=255,
        description=(
            "Column holding the turns: ShareGPT from/value (human/gpt) or role/content "
            "(user/assistant) objects. The first user turn is the question (image markers "
            "removed), the last assistant turn the answer."
        ),
    )
    images: str = Field(
        default="image", min_length=1, max_length=255,
        description="Column holding the image path(s) (LLaVA-CoT-100k: image; Mulberry-SFT: images).",
    )


class DatasetRef(Schema):
    """A data set: hub name, local path (parquet, jsonl, json) or storage URI."""

    source: SourceNoCredentials = Field(
        min_length=1,
        max_length=1024,
        description="Hub data set name, or a path/URI to parquet, jsonl or json files.",
    )
    subset: str | None = Field(
        default=None, max_length=255, description="Hub configuration name, if any."
    )
    split: str = Field(
        default="train", min_length=1, max_length=255, description="Split to read."
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Rename map from this data set's column names to the ones the stage expects "
            "(for example {image: img, question: query, answer: label})."
        ),
    )
    limit: int | None = Field(
        default=None, ge=1, description="Read at most this many rows (after shuffling off)."
    )
    max_image_pixels: int = Field(
        default=8192 * 8192,
        ge=1,
        le=1_000_000_000,
        description=(
            "Rows with an image above this many pixels (width x height, read from the "
            "header) are skipped and counted as oversized_image, as are decompression "
            "bombs; the model's processor resizes far below this anyway."
        ),
    )
    image_roots: list[SourceNoCredentials] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Folders (paths, file://, pvc:// or s3:// URIs) where relative image paths of the "
            "rows are looked up, after the source's own folder, its data files' folders and the "
            "zip archives there (Vision-R1-cold: the LLaVA-CoT-100k and Mulberry-SFT images)."
        ),
    )
    conversation: ConversationFields | None = Field(
        default=None,
        description=(
            "Read a conversation-only data set (LLaVA-CoT-100k, Mulberry-SFT) as question, "
            "answer and images rows: for the bridge and RL readers."
        ),
    )


# --- stage settings (what the trainer needs; the CRD documents them) -------------

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
AUTO_CHECKPOINTING_TOKENS = 2048

ActivationCheckpointing = Literal["auto", "on", "off"]


def activation_checkpointing_on(setting: str, sequence_tokens: int) -> bool:
    """Whether a stage recomputes activations in backward: ``on``, ``off``, or ``auto`` by length."""
    return setting == "on" or (setting == "auto" and sequence_tokens >= AUTO_CHECKPOINTING_TOKENS)


def _activation_checkpointing_field():
    return Field(
        default="auto",
        description="Recompute each layer's activations in backward instead of keeping them "
        f"(memory for time): on, off, or auto (on when a sequence can reach {AUTO_CHECKPOINTING_TOKENS} tokens).",
    )


def _collective_timeout_field():
    return Field(
        default=60.0, gt=0, le=1440,
        description="Minutes a rank waits in a collective (barrier, all-reduce) before failing; "
        "longer than a checkpoint upload, which the other ranks wait for.",
    )


class LoraSettings(Schema):
    """LoRA (Hu et al., arXiv 2106.09685, through peft): low-rank adapters on the language
    model's linear layers instead of full fine-tuning; merged into the committed model."""

    enabled: bool = Field(
        default=False,
        description="Train LoRA adapters instead of every weight (the paper: off, full fine-tuning). "
        "The committed model is the base with W + (alpha / rank) x B A merged in: a plain model.",
    )
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r of each adapter.")
    alpha: float = Field(default=32.0, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on each adapter's input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, max_length=32,
        description="Names of the language model's linear layers that get adapters (the vision "
        "tower never does); every other language-model weight stays frozen.",
    )


def _lora_field():
    return Field(default_factory=LoraSettings, description="LoRA adapters instead of full fine-tuning (peft).")


class SFTSettings(Schema):
    """Cold-start supervised fine-tuning (defaults from the paper's run: Vision-R1's
    LLaMA-Factory config for Qwen2.5-VL-7B, and LLaMA-Factory's own defaults where that
    config sets nothing)."""

    epochs: float = Field(default=2.0, gt=0, le=100, description="Training epochs.")
    learning_rate: float = Field(default=5e-6, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, le=1, description="Fraction of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    cutoff_length: int = Field(
        default=16384, ge=16, le=1_048_576, description="Maximum tokens per training sample."
    )
    per_device_batch_size: int = Field(
        default=1, ge=1, le=1024, description="Samples per device per micro-step."
    )
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=4096,
        description="Micro-steps per optimizer step (4: Vision-R1's 8-GPU config, a global "
        "batch of 8 x 1 x 4 = 32).",
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Training precision."
    )
    deepspeed_zero_stage: Literal[0, 1, 2, 3] = Field(
        default=3,
        description="DeepSpeed ZeRO stage, on GPUs or CPU ranks (0: plain torch data parallelism). "
        "A stage where DeepSpeed cannot run exits 2.",
    )
    activation_checkpointing: ActivationCheckpointing = _activation_checkpointing_field()
    collective_timeout_minutes: float = _collective_timeout_field()
    packing: bool = Field(
        default=False,
        description="Pack several samples per sequence (up to cutoffLength), kept apart as "
        "LLaMA-Factory's neat_packing: positions restart per sample, attention is block-diagonal.",
    )
    freeze_vision_tower: bool = Field(
        default=True,
        description="Keep the vision encoder (patch embedding and blocks) frozen, as "
        "LLaMA-Factory does by default (Vision-R1's config keeps it).",
    )
    freeze_multi_modal_projector: bool = Field(
        default=True,
        description="Keep the vision-language projector (visual.merger) frozen, as "
        "LLaMA-Factory does by default.",
    )
    image_max_pixels: int = Field(
        default=768 * 768, ge=28 * 28, le=100_000_000,
        description="Images above this many pixels are scaled down to it before the image "
        "processor (LLaMA-Factory's image_max_pixels default, 768 x 768).",
    )
    image_min_pixels: int = Field(
        default=32 * 32, ge=1, le=100_000_000,
        description="Images below this many pixels are scaled up to it (LLaMA-Factory's "
        "image_min_pixels default, 32 x 32).",
    )
    save_every_steps: int = Field(
        default=500, ge=1, description="Commit a resumable checkpoint every N optimizer steps."
    )
    seed: int = Field(default=42, ge=0, description="Seed for data order and init.")
    lora: LoraSettings = _lora_field()

    cel_rules = (
        CelRule(
            "self.imageMinPixels <= self.imageMaxPixels",
            "imageMinPixels must not be above imageMaxPixels",
            ".imageMinPixels",
        ),
    )

    @model_validator(mode="after")
    def _image_bounds(self) -> SFTSettings:
        if self.image_min_pixels > self.image_max_pixels:
            raise_problems([("imageMinPixels", f"{self.image_min_pixels} is above imageMaxPixels "
                                               f"({self.image_max_pixels})")])
        return self


REWARD_FUNCTION = r"^(hfrrf|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"


class RewardTerm(Schema):
    """One weighted term of the GRPO reward."""

    function: str = Field(
        max_length=200, pattern=REWARD_FUNCTION,
        description="hfrrf, or module:function importable in the trainer image (docs/grpo.md).",
    )
    weight: float = Field(default=1.0, ge=-100, le=100, description="Its weight in the sum.")


class DataSlice(Schema):
    """A slice of the RL set for one PTST stage (FastCuRL, arXiv 2503.17287)."""

    cel_rules = (CelRule("self.start < self.end", "start must be below end", ".end"),)

    by: Literal["promptLength", "order"] = Field(
        default="promptLength",
        description="promptLength: the rows sorted by their question's length in tokens (FastCuRL's "
        "length-aware segmentation; ties keep file order); order: the rows as the file lists them.",
    )
    start: float = Field(default=0.0, ge=0, lt=1, description="Start of the slice, a fraction of the rows.")
    end: float = Field(default=1.0, gt=0, le=1, description="End of the slice (exclusive), a fraction of the rows.")

    @model_validator(mode="after")
    def _ordered(self) -> DataSlice:
        if self.start >= self.end:
            raise_problems([("end", f"{self.end} is not above start ({self.start})")])
        return self


class PTSTStage(Schema):
    """One Progressive Thinking Suppression Training stage (one GRPO run)."""

    max_completion_length: int = Field(
        ge=16, le=131072, description="Completion budget in tokens (the paper: 4096, then 8192)."
    )
    num_generations: int = Field(
        ge=2, le=512, description="Samples per prompt, the GRPO group size (16, then 8)."
    )
    steps: int = Field(default=100, ge=1, le=1_000_000, description="Optimizer steps.")
    data_slice: DataSlice | None = Field(
        default=None,
        description="Train this stage on a slice of the RL set only (FastCuRL, arXiv 2503.17287: "
        "short prompts first, e.g. {by: promptLength, end: 0.5}); default: every row.",
    )


def default_ptst() -> list[PTSTStage]:
    """The paper's optimum: 4K x 16 then 8K x 8, constant sampling budget."""
    return [
        PTSTStage.model_validate({"maxCompletionLength": 4096, "numGenerations": 16}),
        PTSTStage.model_validate({"maxCompletionLength": 8192, "numGenerations": 8}),
    ]


class GRPOValidation(Schema):
    """Scoring a held-out split during GRPO training, with the eval stage's extraction and
    scoring rules (docs/grpo.md); off by default, as in the paper."""

    cel_rules = (
        CelRule(
            "!has(self.everySteps) || self.everySteps == 0 || has(self.benchmark) != has(self.data)",
            "validation with everySteps above 0 needs exactly one of benchmark and data",
            ".everySteps",
        ),
    )

    every_steps: int = Field(
        default=0, ge=0, le=1_000_000,
        description="Score the held-out split after every N optimizer steps of each PTST stage "
        "(steps N, 2N, ...); 0: off (the paper).",
    )
    benchmark: str | None = Field(
        default=None, max_length=40, pattern=DNS_LABEL,
        description="The held-out split: the name of one of spec.data.benchmarks (scored by its "
        "format's rules, as the eval stage scores it).",
    )
    data: DatasetRef | None = Field(
        default=None,
        description="The held-out split: rows in the RL set's format (problem, answer, images), "
        "e.g. geometry3k's test split, scored as free-form or inline-choice answers.",
    )
    limit: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Score only the split's first N rows each time (default: every row).",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=131072,
        description="Completion budget in tokens (default: the PTST stage's maxCompletionLength).",
    )
    temperature: float = Field(
        default=0.0, ge=0, le=2, description="Sampling temperature; 0: greedy decoding."
    )

    @model_validator(mode="after")
    def _one_source(self) -> GRPOValidation:
        if self.every_steps > 0 and (self.benchmark is None) == (self.data is None):
            raise_problems([("everySteps", "validation needs exactly one of benchmark and data")])
        return self


class GRPOSettings(Schema):
    """GRPO settings shared by every PTST stage (defaults from the paper)."""

    epsilon_low: float = Field(default=0.2, gt=0, lt=1, description="Lower clip range.")
    epsilon_high: float = Field(default=0.2, gt=0, description="Upper clip range.")
    beta: float = Field(default=0.01, ge=0, description="KL penalty coefficient.")
    learning_rate: float = Field(default=1e-6, gt=0, lt=1, description="Learning rate.")
    temperature: float = Field(default=1.0, gt=0, le=2, description="Rollout temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Rollout top_p.")
    rollout_batch_size: int = Field(
        default=128, ge=1, le=65536, description="Prompts per step (each sampled numGenerations times)."
    )
    mini_batch_size: int | None = Field(
        default=None, ge=1, description="Prompts per optimizer update (default: rolloutBatchSize)."
    )
    micro_batch_size: int = Field(
        default=4, ge=1, le=4096,
        description="Completions per forward/backward pass; gradients accumulate up to the mini-batch.",
    )
    updates_per_batch: int = Field(
        default=1, ge=1, le=64, description="Optimizer passes over each rollout batch (uses old log-probs)."
    )
    loss_aggregation: Literal["sequence_mean", "token_mean", "dr_grpo"] = Field(
        default="sequence_mean",
        description="sequence_mean: mean over each completion, then over completions (GRPO "
        "paper); token_mean: mean over all completion tokens; dr_grpo: the sum over all "
        "completion tokens divided by completions x maxCompletionLength (Dr. GRPO, arXiv 2503.20783).",
    )
    advantage_scale: Literal["std", "none"] = Field(
        default="std",
        description="std: advantages (r - group mean) / (group std + 1e-4) (GRPO paper); none: "
        "r - group mean, without the std division (Dr. GRPO, arXiv 2503.20783; TRL's "
        "scale_rewards: none, verl's norm_adv_by_std_in_grpo: false).",
    )
    importance_sampling: Literal["token", "sequence"] = Field(
        default="token",
        description="token: one importance ratio per token (GRPO paper); sequence: one per "
        "completion, exp(mean of its token log-ratios), clipped per completion (GSPO, arXiv "
        "2507.18071; TRL's importance_sampling_level: sequence).",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="Drop groups whose rewards are all equal (no signal) and refill the batch with "
        "fresh prompts, up to dynamicSamplingMaxRounds extra rollouts per step (DAPO, arXiv 2503.14476).",
    )
    dynamic_sampling_max_rounds: int = Field(
        default=3, ge=1, le=64,
        description="With dynamicSampling: the most extra rollout rounds per step, each of as many "
        "fresh prompts as groups are still missing; a step that runs out trains on the groups it kept.",
    )
    overlong: Literal["none", "mask", "softPenalty"] = Field(
        default="none",
        description="Completions that reach maxCompletionLength: none: trained on as they are "
        "(GRPO paper); mask: truncated ones (no end of turn) are left out of the loss (TRL's "
        "mask_truncated_completions); softPenalty: DAPO's soft overlong punishment, a reward "
        "falling linearly from 0 to -overlongPenaltyFactor over the last overlongBuffer tokens.",
    )
    overlong_buffer: int = Field(
        default=0, ge=0, le=131072,
        description="With overlong: softPenalty, the buffer length L_cache in tokens (DAPO: 4096 of "
        "20480); at least 1 and at most each PTST stage's maxCompletionLength.",
    )
    overlong_penalty_factor: float = Field(
        default=1.0, gt=0, le=10,
        description="With overlong: softPenalty, the penalty at maxCompletionLength (DAPO: 1).",
    )
    reward: str = Field(
        default="hfrrf", max_length=200, pattern=REWARD_FUNCTION,
        description="Reward function: hfrrf, the Hard Format Result Reward (1 only if format "
        "and answer are both right), or module:function importable in the trainer image, "
        "called as function(completion, answer, problem) -> float (docs/grpo.md).",
    )
    extra_rewards: list[RewardTerm] = Field(
        default_factory=list, max_length=8,
        description="Weighted reward terms added to reward: reward + sum of weight x function.",
    )
    reward_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600,
        description="Time bound of one plug-in reward call (module:function); one that overruns "
        "or raises scores 0 and is counted, the step goes on.",
    )
    length_penalty: float = Field(
        default=0.0, ge=0, lt=1,
        description="alpha of the group-normalised length penalty on correct answers (Arora and "
        "Zanette, arXiv 2502.04463): a correct completion's reward is multiplied by 1 - alpha x "
        "sigmoid(z), z its length's z-score among its group's correct completions; 0: off.",
    )
    reference: Literal["stageStart", "coldStart"] = Field(
        default="stageStart",
        description="The KL anchor: stageStart, each PTST stage's starting model (the previous "
        "stage's output); coldStart, the cold-start SFT output for every PTST stage. The KL to "
        "the cold-start model is logged either way (kl_cold_start).",
    )
    validation: GRPOValidation = Field(
        default_factory=GRPOValidation,
        description="Validation during training: every N steps, accuracy on a held-out split "
        "(metrics validation_*, status validationAccuracy); off by default.",
    )
    rollout_backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Rollout engine: vllm (GPU) or hf (transformers, CPU or GPU)."
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.35, gt=0, le=0.95,
        description="Share of each GPU the rank's colocated vLLM engine takes for weights and KV "
        "cache while it samples (it sleeps, freeing both, while the policy trains).",
    )
    vllm_tensor_parallel_size: int = Field(
        default=1, ge=1, le=8,
        description="GPUs one colocated vLLM engine spans (consecutive ranks of a node; 4 for a "
        "32B model, 8 for 72B on 80 GB GPUs). Must divide the GPUs per node.",
    )
    max_prompt_length: int = Field(
        default=4096, ge=16, description="Prompt tokens kept (image tokens included)."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    warmup_steps: int = Field(
        default=5, ge=0, le=100_000,
        description="Optimizer steps of each PTST stage over which the learning rate rises "
        "linearly to learningRate (step s uses (s + 1) / warmupSteps of it), then stays constant.",
    )
    deepspeed_zero_stage: Literal[0, 1, 2, 3] = Field(
        default=3,
        description="DeepSpeed ZeRO stage, on GPUs or CPU ranks (0: plain torch data parallelism). "
        "A stage where DeepSpeed cannot run exits 2.",
    )
    activation_checkpointing: ActivationCheckpointing = _activation_checkpointing_field()
    collective_timeout_minutes: float = _collective_timeout_field()
    save_every_steps: int = Field(
        default=20, ge=1, description="Commit a resumable checkpoint every N steps."
    )
    seed: int = Field(default=42, ge=0, description="Seed for rollouts and data order.")
    lora: LoraSettings = _lora_field()

    cel_rules = (
        CelRule(
            "!has(self.miniBatchSize) || self.miniBatchSize <= self.rolloutBatchSize",
            "miniBatchSize must not be above rolloutBatchSize",
            ".miniBatchSize",
        ),
        CelRule(
            "!has(self.overlong) || self.overlong != 'softPenalty' || "
            "(has(self.overlongBuffer) && self.overlongBuffer >= 1)",
            "overlong: softPenalty needs overlongBuffer of at least 1 token",
            ".overlongBuffer",
        ),
    )

    def rank_split_problems(self, world_size: int) -> list[tuple[str, str]]:
        """Fields whose prompts do not split evenly over ``world_size`` ranks.

        Every rank must run the same number of forward passes: under ZeRO-3 each is a
        collective, and a rank with fewer rows would wait for the others forever.
        """
        problems = []
        for field, value in (("rolloutBatchSize", self.rollout_batch_size), ("miniBatchSize", self.mini_batch_size)):
            if value is not None and value % world_size:
                problems.append((field, f"{value} prompts do not split evenly over {world_size} ranks"))
        return problems

    @model_validator(mode="after")
    def _mini_batch(self) -> GRPOSettings:
        if self.mini_batch_size is not None and self.mini_batch_size > self.rollout_batch_size:
            raise_problems([(
                "miniBatchSize",
                f"{self.mini_batch_size} is above rolloutBatchSize ({self.rollout_batch_size})",
            )])
        if self.overlong == "softPenalty" and self.overlong_buffer < 1:
            raise_problems([("overlongBuffer", "overlong: softPenalty needs overlongBuffer of at least 1 token")])
        return self

    def length_problems(self, max_completion_length: int) -> list[tuple[str, str]]:
        """Settings that do not fit a PTST stage's completion budget."""
        if self.overlong == "softPenalty" and self.overlong_buffer > max_completion_length:
            return [("overlongBuffer", f"{self.overlong_buffer} is above maxCompletionLength ({max_completion_length})")]
        return []


class JudgeSpec(Schema):
    """An LLM judge behind any OpenAI-compatible endpoint (the paper: GPT-4o-mini)."""

    endpoint: HttpUrlNoCredentials = Field(max_length=1024, description="API base URL.")
    model: str = Field(min_length=1, max_length=255, description="Judge model name.")
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key."
    )


BenchmarkFormat = Literal["mathvista", "mathverse", "mmmath", "dynamath", "synthetic"]


class BenchmarkSpec(Schema):
    """An evaluation benchmark: which public schema it follows and where it is."""

    name: str = Field(
        max_length=40, pattern=DNS_LABEL, description="Unique name used in results and metrics."
    )
    format: BenchmarkFormat = Field(description="Field layout and scoring rules to apply.")
    data: DatasetRef = Field(description="Where the benchmark rows are.")
    predictions_only: bool = Field(
        default=False,
        description=(
            "Sample and extract answers without scoring (a split whose answers are withheld, "
            "such as MathVista test): the results hold the predictions file in the "
            "benchmark's submission format, and rows without an answer are kept."
        ),
    )


class EvalSettings(Schema):
    """Benchmark scoring (sampling defaults from the paper's evaluation)."""

    benchmarks: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Names from spec.data.benchmarks to score; empty means all of them.",
    )
    temperature: float = Field(default=0.6, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Sampling top_p.")
    max_tokens: int = Field(default=16000, ge=1, le=1_048_576, description="Maximum new tokens.")
    max_retries: int = Field(
        default=2, ge=0, le=20, description="Resample a completion that lacks </answer> this often."
    )
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="Generation engine.")
    judge: JudgeSpec | None = Field(
        default=None, description="Optional LLM judge; rule-based scores are always reported."
    )
    include_baselines: bool = Field(
        default=False,
        description="Also score the base model, the SFT model and every PTST stage, side by side.",
    )
    format_instruction_for: list[str] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Model labels (from models, e.g. base) whose prompts end with the output-format "
            "instruction the trained models learned (<think>..</think><answer> Final Answer: "
            "X </answer>), so rule-based extraction does not under-score a baseline; empty "
            "(the default) prompts every model with the benchmark's own text."
        ),
    )


# --- per-stage configs: what a stage's entrypoint receives ---------------------------


StageKind = Literal["bridge", "sft", "grpo", "eval"]
STAGE_KINDS: tuple[str, ...] = ("bridge", "sft", "grpo", "eval")


class StageContext(Schema):
    """What every stage is told about where it runs and where its artifacts go."""

    run: str = Field(min_length=1, max_length=63, description="Name of the VisionR1Run.")
    namespace: str = Field(default="default", max_length=63, description="Its namespace.")
    stage: str = Field(
        min_length=1, max_length=20, pattern=DNS_LABEL, description="Stage name (sft, ptst-1...)."
    )
    attempt: int = Field(default=1, ge=1, description="1 for the first try, then each retry.")
    output_uri: StorageUriNoCredentials = Field( description="Where this stage commits its artifacts."
    )
    storage: StorageSpec = Field(description="Storage settings (endpoint, credentials Secret).")
    model: ModelSpec = Field(description="The run's base model.")
    metrics_port: int = Field(
        default=9400, ge=0, le=65535, description="Prometheus exporter port (0 disables)."
    )
    termination_message_path: str = Field(
        default="/dev/termination-log",
        description="Where the stage's JSON summary is written at exit.",
    )


class BridgeStageConfig(StageContext):
    kind: Literal["bridge"] = "bridge"
    source: DatasetRef = Field(description="Image/question/answer rows to bridge.")
    bridge: BridgeSettings = Field(description="Bridge settings.")


class SFTStageConfig(StageContext):
    kind: Literal["sft"] = "sft"
    data_uri: StorageUriNoCredentials | None = Field(
        default=None,
        description="Committed cold-start data set from the bridge stage, if it ran.",
    )
    data: DatasetRef | None = Field(
        default=None, description="A given cold-start data set (when the bridge stage is off)."
    )
    sft: SFTSettings = Field(description="SFT settings.")

    @model_validator(mode="after")
    def _one_data_source(self) -> SFTStageConfig:
        if (self.data_uri is None) == (self.data is None):
            raise_problems([("dataUri", "exactly one of dataUri and data must be set")])
        return self


class GRPOStageConfig(StageContext):
    kind: Literal["grpo"] = "grpo"
    ptst_index: int = Field(ge=1, description="1-based PTST stage number.")
    ptst_total: int = Field(ge=1, description="Number of PTST stages in the run.")
    init_uri: StorageUriNoCredentials | None = Field(
        default=None,
        description="Stage output to start from (previous PTST stage or SFT); None = base model.",
    )
    cold_start_uri: StorageUriNoCredentials | None = Field(
        default=None,
        description="The cold-start SFT output (reference: coldStart, and kl_cold_start); None = base model.",
    )
    data: DatasetRef = Field(description="The RL set (geometry3k format).")
    ptst: PTSTStage = Field(description="This stage's length budget and group size.")
    grpo: GRPOSettings = Field(description="Shared GRPO settings.")
    validation_benchmark: BenchmarkSpec | None = Field(
        default=None,
        description="The benchmark grpo.validation.benchmark names (set by the plan from spec.data.benchmarks).",
    )

    @model_validator(mode="after")
    def _fits_the_budget(self) -> GRPOStageConfig:
        raise_problems([(f"grpo.{f}", m) for f, m in self.grpo.length_problems(self.ptst.max_completion_length)])
        named, given = self.grpo.validation.benchmark, self.validation_benchmark
        if self.grpo.validation.every_steps > 0 and named is not None and (given is None or given.name != named):
            raise_problems([("validationBenchmark", f"grpo.validation.benchmark names {named!r}, but the stage "
                             f"was given {given.name if given else 'none'}")])
        return self


class EvalStageConfig(StageContext):
    kind: Literal["eval"] = "eval"
    # Any text (local runs pass paths) but no user-info: the values reach the summary.
    models: dict[str, url_no_credentials(r"^.+$")] = Field(
        min_length=1,
        description="Label -> model to score: a stage output URI, or 'base' for the run's model.",
    )
    benchmarks: list[BenchmarkSpec] = Field(min_length=1, description="Benchmarks to score.")
    eval: EvalSettings = Field(description="Sampling and scoring settings.")


StageConfig = Annotated[
    Union[BridgeStageConfig, SFTStageConfig, GRPOStageConfig, EvalStageConfig],
    Field(discriminator="kind"),
]


STAGE_CONFIGS: dict[str, type[StageContext]] = {
    "bridge": BridgeStageConfig,
    "sft": SFTStageConfig,
    "grpo": GRPOStageConfig,
    "eval": EvalStageConfig,
}


class ConfigError(Exception):
    """A stage config file that cannot be used; the message names the file and field."""


def load_stage_config(path: str | Path, expected_kind: str | None = None):
    """Read and validate a stage config JSON file (the operator/executor contract)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in STAGE_CONFIGS:
        raise ConfigError(f"{path}: kind: must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    if expected_kind is not None and kind != expected_kind:
        raise ConfigError(
            f"{path}: kind: this is a {kind!r} stage config, expected {expected_kind!r}"
        )
    try:
        return STAGE_CONFIGS[kind].model_validate(raw, **WIRE)
    except ValidationError as exc:
        lines = [f"{path}: {p}: {m}" for p, m in format_errors(exc)]
        raise ConfigError("\n".join(lines)) from None


# The artifact each kind of stage commits last under its output URI: the stage is done
# when it is committed (the next stage reads it).
FINAL_ARTIFACT = {"bridge": "dataset", "sft": "model", "grpo": "model", "eval": "results"}


def artifact_uri(storage_uri: str, *parts: str) -> str:
    """``<storage>/<namespace>/<run>/<stage>``: where a stage commits its artifacts."""
    base = storage_uri.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p.strip("/"))])
