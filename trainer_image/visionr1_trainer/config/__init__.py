"""Stage configs: the one schema both sides of the product share.

The operator (or the local executor) renders one of the ``*StageConfig`` models below
as JSON for each stage; the stage's entrypoint (``python -m visionr1_trainer <stage>
--config stage.json``) validates the same JSON with the same model. The settings
models (``SFTSettings``, ``GRPOSettings``...) are also what ``visionr1_operator.api``
composes into the ``VisionR1Run`` spec, so a field and its description live in one
place, and the CRD is generated from them.

The settings live one module a stage: ``sources`` (model, storage, Secrets, data sets),
``bridge``, ``training`` (what SFT and GRPO share), ``sft``, ``grpo``, ``eval``; this
module holds the per-stage configs and their loader, and re-exports every settings name,
so callers import from ``visionr1_trainer.config`` alone.

Pydantic only: this package must import without torch (the operator imports it).
Field names are camelCase on the wire (the Kubernetes convention) and snake_case in
Python; unknown fields are errors, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationError, model_validator

# The schema machinery and the shared patterns, re-exported: callers import them from here.
from ..schema import (  # noqa: F401
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

# The settings of each stage, one module each, re-exported: callers import them from here.
from .bridge import (  # noqa: E402,F401
    Backend,
    BridgeFilters,
    BridgePrompts,
    BridgeSettings,
    GeneratorSpec,
    MAX_PROMPT_CHARS,
)
from .eval import (  # noqa: E402,F401
    BenchmarkFormat,
    BenchmarkSpec,
    EvalSettings,
    JudgeSpec,
)
from .grpo import (  # noqa: E402,F401
    DataSlice,
    GRPOSettings,
    GRPOValidation,
    PTSTStage,
    REWARD_FUNCTION,
    RewardTerm,
    default_ptst,
)
from .sft import (  # noqa: E402,F401
    SFTSettings,
)
from .sources import (  # noqa: E402,F401
    ConversationFields,
    DatasetRef,
    ModelSpec,
    SecretKeyRef,
    StorageSpec,
)
from .training import (  # noqa: E402,F401
    AUTO_CHECKPOINTING_TOKENS,
    ActivationCheckpointing,
    LoraSettings,
    _activation_checkpointing_field,
    _collective_timeout_field,
    _lora_field,
    activation_checkpointing_on,
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
