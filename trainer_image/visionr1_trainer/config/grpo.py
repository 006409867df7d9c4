"""The GRPO stage's settings: the objective and its options, PTST's stages, rewards, validation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import (
    DNS_LABEL,
    CelRule,
    Schema,
    raise_problems,
)
from .sources import DatasetRef
from .training import (
    ActivationCheckpointing,
    LoraSettings,
    _activation_checkpointing_field,
    _collective_timeout_field,
    _lora_field,
)


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
    shared_prefix: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Score each prompt once for all its completions (its KV cache repeated for the "
        "group's rows) rather than once per row: on, off, or auto (on, but off under ZeRO-3, where every "
        "pass through the model gathers each layer again, so the prompt's own pass doubles the gathers "
        "of every scoring forward and backward). A micro-batch in which no two rows share a prompt is "
        "scored row by row either way. Needs the layers' KV cache: on with activationCheckpointing is refused.",
    )
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
        CelRule(
            "!has(self.sharedPrefix) || self.sharedPrefix != 'on' || "
            "!has(self.activationCheckpointing) || self.activationCheckpointing != 'on'",
            "sharedPrefix: on needs the layers' KV cache, which activationCheckpointing: on does not keep",
            ".sharedPrefix",
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
        if self.shared_prefix == "on" and self.activation_checkpointing == "on":
            raise_problems([("sharedPrefix", "on needs the layers' KV cache, which activationCheckpointing: on "
                                             "does not keep; set sharedPrefix auto or off")])
        return self

    def length_problems(self, max_completion_length: int) -> list[tuple[str, str]]:
        """Settings that do not fit a PTST stage's completion budget."""
        if self.overlong == "softPenalty" and self.overlong_buffer > max_completion_length:
            return [("overlongBuffer", f"{self.overlong_buffer} is above maxCompletionLength ({max_completion_length})")]
        return []
