"""The VisionR1Run custom resource: spec and status, the one source of truth.

The spec composes the stage settings of ``visionr1_trainer.config`` (one schema for
both sides) with what only the cluster needs: resources, placement and run control.
The CRD in ``crds/`` is generated from these models (``visionr1 crd``); every
cross-field rule below exists twice on purpose, once as a pydantic validator (for
``visionr1 validate``, the operator and the local executor) and once as a CEL rule
(``cel_rules``) that the API server enforces on ``kubectl apply``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from visionr1_trainer.config import (
    DNS_LABEL,
    CelRule,
    DNS_SUBDOMAIN,
    BenchmarkSpec,
    BridgeSettings,
    DatasetRef,
    EvalSettings,
    GRPOSettings,
    ModelSpec,
    PTSTStage,
    Quantity,
    Schema,
    SFTSettings,
    StorageSpec,
    default_ptst,
    raise_problems,
)

from .affinity import MAX_LABELS, Affinity, LabelValue
from .pod_settings import PodSettings, SizeLimit

GROUP = "visionr1.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "VisionR1Run"
PLURAL = "visionr1runs"
SINGULAR = "visionr1run"
SHORT_NAMES = ["vr1"]
# Job names are <run>-<stage>-<attempt> and must stay a 63-character DNS label
# (the job-name label, and pod hostnames of Indexed Jobs): 40 leaves room for the
# longest stage name and a three-digit attempt.
MAX_RUN_NAME = 40
# kubectl create with metadata.generateName: the API server appends 5 random characters.
MAX_GENERATE_NAME = MAX_RUN_NAME - 5


# --- placement and resources ----------------------------------------------------------


class Toleration(Schema):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Match operator.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty means all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class Resources(Schema):
    """Compute and placement of one stage's pods."""

    nodes: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Pods (one per node); above 1 the stage runs as an Indexed Job with torchrun rendezvous.",
    )
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="GPUs per pod.")
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^([a-z0-9.-]+/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Extended resource name of the GPUs.",
    )
    cpu: Quantity | None = Field(
        default=None,
        description="CPU request and limit per pod (Kubernetes quantity).",
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory request and limit per pod (Kubernetes quantity).",
    )
    shared_memory: Quantity = Field(
        default="16Gi",
        description="Size of the memory-backed /dev/shm (NCCL and data loaders need more than the default 64Mi).",
    )
    # A pattern, not the int-or-string Quantity with its CEL rule: the CRD's CEL cost budget is shared.
    scratch_size: SizeLimit | None = Field(
        default=None,
        description="Size of /scratch, a quantity such as '500Gi' (the hub cache, the work directory, the JIT caches): the emptyDir's "
        "sizeLimit and the pod's ephemeral-storage request. Default: from the model's parameter count "
        "in its name and the stage's kind (see docs/cluster.md), else 200Gi.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the pods tolerate."
    )
    # Typed and bounded, never free-form: see affinity.py for what a free-form one allowed.
    affinity: Affinity | None = Field(default=None, description="A core/v1 Affinity for the pods.")
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods."
    )
    image: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^\S+$",
        description="Trainer image for this stage (default: spec.image, then the operator's).",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, max_length=16, description="Names of Secrets to pull the image with."
    )
    service_account_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="ServiceAccount of the pods."
    )


class StageControl(Schema):
    """What every stage has besides its training settings."""

    enabled: bool = Field(default=True, description="Run this stage.")
    resources: Resources = Field(default_factory=Resources, description="Compute and placement.")
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries after a failed attempt; each retry resumes from the stage's last committed checkpoint.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of one attempt."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete a finished attempt's Job after this many seconds."
    )
    pod: PodSettings = Field(
        default_factory=PodSettings,
        description="Labels, annotations, environment, volumes, scheduler, runtime class and RDMA of "
        "the stage's pods, besides what the operator sets (which they may not override).",
    )


class BridgeStageSpec(StageControl, BridgeSettings):
    """Modality Bridging: builds the cold-start CoT data set (Vision-R1-cold)."""


class SFTStageSpec(StageControl, SFTSettings):
    """Cold-start SFT of the base model on the cold-start set."""


class GRPOStageSpec(StageControl, GRPOSettings):
    """GRPO settings and resources shared by every PTST stage."""

    # Every rank must run as many forward passes as the others (under ZeRO-3 each is a
    # collective): the prompts of a batch split evenly over nodes x processes per node.
    cel_rules = tuple(
        CelRule(
            f"!has(self.{field}) || self.{field} % (self.resources.nodes * "
            "(self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            f"{field} must split evenly over the stage's ranks (nodes x gpusPerNode)",
            f".{field}",
        )
        for field in ("rolloutBatchSize", "miniBatchSize")
    ) + (
        CelRule(
            "self.vllmTensorParallelSize == 1 || (self.resources.gpusPerNode > 0 && "
            "self.resources.gpusPerNode % self.vllmTensorParallelSize == 0)",
            "vllmTensorParallelSize must divide resources.gpusPerNode (one engine spans GPUs of one node)",
            ".vllmTensorParallelSize",
        ),
    )

    allow_unequal_budget: bool = Field(
        default=False,
        description="Allow maxCompletionLength x numGenerations to differ across PTST stages "
        "(the paper keeps this sampling budget constant).",
    )


    @model_validator(mode="after")
    def _splits_over_ranks(self) -> GRPOStageSpec:
        r = self.resources
        problems = self.rank_split_problems(r.nodes * max(r.gpus_per_node, 1))
        tp = self.vllm_tensor_parallel_size
        if tp > 1 and (r.gpus_per_node == 0 or r.gpus_per_node % tp):
            problems.append(("vllmTensorParallelSize",
                             f"{tp} does not divide resources.gpusPerNode ({r.gpus_per_node}): "
                             "one vLLM engine spans GPUs of one node"))
        raise_problems(problems)
        return self


class EvalStageSpec(StageControl, EvalSettings):
    """Benchmark scoring of the final model (and, optionally, of every earlier one)."""


def _stages_ptst_problems(ptst: list[PTSTStage], allow_unequal_budget: bool) -> list:
    problems = []
    for i in range(1, len(ptst)):
        prev, cur = ptst[i - 1], ptst[i]
        if cur.max_completion_length < prev.max_completion_length:
            problems.append((
                f"ptst[{i}].maxCompletionLength",
                f"{cur.max_completion_length} is below stage {i - 1}'s "
                f"{prev.max_completion_length}: PTST relaxes the length budget, it never tightens it",
            ))
    first = ptst[0].max_completion_length * ptst[0].num_generations if ptst else 0
    if not allow_unequal_budget:
        for i, cur in enumerate(ptst[1:], start=1):
            budget = cur.max_completion_length * cur.num_generations
            if budget != first:
                problems.append((
                    f"ptst[{i}].numGenerations",
                    f"maxCompletionLength x numGenerations = {cur.max_completion_length} x "
                    f"{cur.num_generations} = {budget}, but stage 0 has {first}: the paper keeps "
                    "the sampling budget constant across PTST stages "
                    "(set spec.stages.grpo.allowUnequalBudget: true to override)",
                ))
    return problems


class Stages(Schema):
    """The pipeline: bridge -> sft -> ptst[0..N-1] (GRPO) -> eval."""

    cel_rules = (
        CelRule(
            "self.ptst.map(s, s.maxCompletionLength).isSorted()",
            "ptst: maxCompletionLength must not decrease across stages",
            ".ptst",
        ),
        CelRule(
            "self.grpo.allowUnequalBudget || self.ptst.all(s, s.maxCompletionLength * "
            "s.numGenerations == self.ptst[0].maxCompletionLength * self.ptst[0].numGenerations)",
            "ptst: maxCompletionLength x numGenerations must be equal across stages "
            "(set grpo.allowUnequalBudget: true to override)",
            ".ptst",
        ),
        CelRule(
            "!has(self.grpo.overlong) || self.grpo.overlong != 'softPenalty' || "
            "self.ptst.all(s, s.maxCompletionLength >= self.grpo.overlongBuffer)",
            "grpo.overlongBuffer must not be above any PTST stage's maxCompletionLength",
            ".grpo.overlongBuffer",
        ),
    )

    bridge: BridgeStageSpec = Field(
        default_factory=BridgeStageSpec, description="Modality Bridging (cold-start data)."
    )
    sft: SFTStageSpec = Field(default_factory=SFTStageSpec, description="Cold-start SFT.")
    grpo: GRPOStageSpec = Field(
        default_factory=GRPOStageSpec, description="GRPO settings shared by the PTST stages."
    )
    ptst: list[PTSTStage] = Field(
        default_factory=default_ptst,
        min_length=1,
        max_length=8,
        description="Progressive Thinking Suppression Training stages, run in order; default "
        "the paper's 4096 x 16 then 8192 x 8.",
    )
    eval: EvalStageSpec = Field(default_factory=EvalStageSpec, description="Evaluation.")

    @model_validator(mode="after")
    def _ptst_rules(self) -> Stages:
        raise_problems(_stages_ptst_problems(self.ptst, self.grpo.allow_unequal_budget) + [
            (f"grpo.{f}", f"{m} of ptst[{i}]")
            for i, s in enumerate(self.ptst) for f, m in self.grpo.length_problems(s.max_completion_length)
        ])
        return self


class DataSpec(Schema):
    """The data sets of the run."""

    bridge_source: DatasetRef | None = Field(
        default=None,
        description="Image/question/answer rows for Modality Bridging (needed when stages.bridge is enabled).",
    )
    cold_start: DatasetRef | None = Field(
        default=None,
        description="A ready cold-start set in Vision-R1-cold (ShareGPT) format, used when "
        "stages.bridge is disabled.",
    )
    rl: DatasetRef | None = Field(
        default=None, description="The RL set in geometry3k format (images, problem, answer)."
    )
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list, max_length=32, description="Evaluation benchmarks."
    )

    cel_rules = (
        CelRule(
            "self.benchmarks.all(a, self.benchmarks.exists_one(b, b.name == a.name))",
            "benchmarks: names must be unique",
            ".benchmarks",
        ),
    )

    @model_validator(mode="after")
    def _unique_benchmarks(self) -> DataSpec:
        seen: dict[str, int] = {}
        problems = []
        for i, bench in enumerate(self.benchmarks):
            if bench.name in seen:
                problems.append((
                    f"benchmarks[{i}].name",
                    f"{bench.name!r} is already used by benchmarks[{seen[bench.name]}]",
                ))
            seen.setdefault(bench.name, i)
        raise_problems(problems)
        return self


class VisionR1RunSpec(Schema):
    """Desired state: one Vision-R1 training run."""

    model: ModelSpec = Field(description="The base model.")
    storage: StorageSpec = Field(description="Where stage artifacts are committed.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data sets.")
    stages: Stages = Field(default_factory=Stages, description="Pipeline stages.")
    image: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^\S+$",
        description="Trainer image for every stage (default: the operator's).",
    )
    suspend: bool = Field(
        default=False, description="Suspend the running stage's Job and stop advancing."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,  # it becomes the Jobs' kueue.x-k8s.io/queue-name label value
        pattern=DNS_SUBDOMAIN,
        description="Kueue LocalQueue: Jobs are created suspended for Kueue to admit "
        "(at most 63 characters: the name is the Jobs' kueue.x-k8s.io/queue-name label).",
    )

    cel_rules = (
        CelRule(
            "!self.stages.bridge.enabled || has(self.data.bridgeSource)",
            "data.bridgeSource is required when stages.bridge.enabled is true",
            ".data.bridgeSource",
        ),
        CelRule(
            "!self.stages.bridge.enabled || !has(self.data.coldStart)",
            "data.coldStart is produced by the bridge stage; give it only when stages.bridge.enabled is false",
            ".data.coldStart",
        ),
        CelRule(
            "!self.stages.sft.enabled || self.stages.bridge.enabled || has(self.data.coldStart)",
            "data.coldStart is required when stages.sft is enabled and stages.bridge is not",
            ".data.coldStart",
        ),
        CelRule(
            "!self.stages.grpo.enabled || has(self.data.rl)",
            "data.rl is required when stages.grpo.enabled is true",
            ".data.rl",
        ),
        CelRule(
            "!self.stages.eval.enabled || size(self.data.benchmarks) > 0",
            "data.benchmarks needs at least one benchmark when stages.eval.enabled is true",
            ".data.benchmarks",
        ),
        CelRule(
            "self.stages.eval.benchmarks.all(n, self.data.benchmarks.exists(b, b.name == n))",
            "stages.eval.benchmarks may only name benchmarks listed in data.benchmarks",
            ".stages.eval.benchmarks",
        ),
        CelRule(
            "!has(self.stages.grpo.validation) || !has(self.stages.grpo.validation.benchmark) || "
            "self.data.benchmarks.exists(b, b.name == self.stages.grpo.validation.benchmark && "
            "!(has(b.predictionsOnly) && b.predictionsOnly))",
            "stages.grpo.validation.benchmark must name a scored benchmark of data.benchmarks",
            ".stages.grpo.validation.benchmark",
        ),
        CelRule(
            "self.stages.bridge.enabled || self.stages.sft.enabled || "
            "self.stages.grpo.enabled || self.stages.eval.enabled",
            "stages: at least one stage must be enabled",
            ".stages",
        ),
        CelRule(
            "!has(self.storage.credentialsSecret) || self.storage.uri.startsWith('s3://')",
            "storage.credentialsSecret is only used with s3:// storage",
            ".storage.credentialsSecret",
        ),
        CelRule(
            "!has(self.storage.endpoint) || self.storage.uri.startsWith('s3://')",
            "storage.endpoint is only used with s3:// storage",
            ".storage.endpoint",
        ),
        CelRule(
            "!has(self.storage.region) || self.storage.uri.startsWith('s3://')",
            "storage.region is only used with s3:// storage",
            ".storage.region",
        ),
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> VisionR1RunSpec:
        s, d = self.stages, self.data
        problems: list[tuple[str, str]] = []
        if s.bridge.enabled and d.bridge_source is None:
            problems.append(("data.bridgeSource", "required when stages.bridge.enabled is true"))
        if s.bridge.enabled and d.cold_start is not None:
            problems.append((
                "data.coldStart",
                "the bridge stage produces the cold-start set; give data.coldStart only "
                "when stages.bridge.enabled is false",
            ))
        if s.sft.enabled and not s.bridge.enabled and d.cold_start is None:
            problems.append((
                "data.coldStart", "required when stages.sft is enabled and stages.bridge is not"
            ))
        if s.grpo.enabled and d.rl is None:
            problems.append(("data.rl", "required when stages.grpo.enabled is true"))
        if s.eval.enabled and not d.benchmarks:
            problems.append((
                "data.benchmarks", "needs at least one benchmark when stages.eval.enabled is true"
            ))
        known = {b.name for b in d.benchmarks}
        for i, name in enumerate(s.eval.benchmarks):
            if name not in known:
                problems.append((
                    f"stages.eval.benchmarks[{i}]",
                    f"{name!r} is not in data.benchmarks (known: {sorted(known) or 'none'})",
                ))
        named = s.grpo.validation.benchmark
        if named is not None:
            bench = next((x for x in d.benchmarks if x.name == named), None)
            if bench is None:
                problems.append(("stages.grpo.validation.benchmark",
                                 f"{named!r} is not in data.benchmarks (known: {sorted(known) or 'none'})"))
            elif bench.predictions_only:
                problems.append(("stages.grpo.validation.benchmark",
                                 f"{named!r} is predictionsOnly (its answers are withheld): nothing to score"))
        if not any(st.enabled for st in (s.bridge, s.sft, s.grpo, s.eval)):
            problems.append(("stages", "at least one stage must be enabled"))
        if self.storage.scheme != "s3":
            for field in ("credentials_secret", "endpoint", "region"):
                if getattr(self.storage, field) is not None:
                    problems.append((
                        f"storage.{_camel(field)}", "only used with s3:// storage"
                    ))
        raise_problems(problems)
        return self


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# --- status -----------------------------------------------------------------------------

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]
CONDITION_TYPES = ("Ready", "Succeeded", "Failed", "Suspended", "InvalidSpec")


class Condition(Schema):
    """A metav1.Condition."""

    type: str = Field(max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9_.\-/]*$", description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="Condition status.")
    reason: str = Field(
        max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Machine-readable CamelCase reason.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="spec generation the condition was set from."
    )


class StageStatus(Schema):
    """The record of one stage."""

    name: str = Field(pattern=DNS_LABEL, max_length=20, description="Stage name (bridge, sft, ptst-1, eval).")
    kind: Literal["bridge", "sft", "grpo", "eval"] = Field(description="Stage entrypoint.")
    state: StageState = Field(default="Pending", description="Where the stage is.")
    attempts: int = Field(default=0, ge=0, description="Attempts started.")
    failures: int = Field(
        default=0,
        ge=0,
        description="Failed attempts counted against backoffLimit (node disruptions and "
        "preemptions are retried without counting).",
    )
    job_name: str | None = Field(default=None, description="Job of the latest attempt.")
    start_time: str | None = Field(
        default=None, description="Start of the first attempt.", json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = Field(
        default=None, description="When the stage finished.", json_schema_extra={"format": "date-time"}
    )
    artifact_uri: str | None = Field(default=None, description="Where the stage's output was committed.")
    config_hash: str | None = Field(
        default=None,
        max_length=64,
        description="Hash of the settings the stage ran with: a spec change to a finished stage is refused.",
    )
    message: str | None = Field(default=None, max_length=32768, description="Why it failed, if it did.")
    summary: dict[str, Any] | None = Field(
        default=None,
        description="The stage's exit summary (last step, key metrics).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Progress(Schema):
    """Live progress of the running stage."""

    stage: str | None = Field(default=None, description="Stage reporting.")
    step: int | None = Field(default=None, ge=0, description="Current step.")
    total_steps: int | None = Field(default=None, ge=0, description="Steps planned.")
    reward: float | None = Field(default=None, description="Latest mean reward (GRPO stages).")
    completion_length: float | None = Field(default=None, description="Latest mean completion length.")
    updated_at: str | None = Field(
        default=None, description="When progress was read.", json_schema_extra={"format": "date-time"}
    )


class VisionR1RunStatus(Schema):
    """Observed state, written by the operator (or the local executor)."""

    phase: Phase = Field(default="Pending", description="Run phase.")
    current_stage: str | None = Field(default=None, description="Stage running now.")
    observed_generation: int | None = Field(default=None, ge=0, description="Last generation acted on.")
    stages: list[StageStatus] = Field(default_factory=list, description="One record per planned stage.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Standard conditions, one per type.",
        # A map keyed by type, as metav1.Conditions are: server-side apply merges by type.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: Progress | None = Field(default=None, description="Live progress.")
    eval: dict[str, Any] | None = Field(
        default=None,
        description="Benchmark results of the eval stage.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


def eval_table(summary: dict[str, Any]) -> dict[str, Any]:
    """The eval stage's summary as ``status.eval``: every benchmark's scores and the error of
    each one that failed (a failed eval stage keeps the scores of the others)."""
    return {k: v for k, v in summary.items() if k not in ("stage", "attempt", "error")}


# --- the resource ---------------------------------------------------------------------


class ObjectMeta(Schema):
    """The parts of metav1.ObjectMeta the run reads; the rest is Kubernetes'."""

    # The API server adds uid, resourceVersion, managedFields... to every object;
    # a manifest read back with `kubectl get -o yaml` must still validate.
    model_config = ConfigDict(extra="allow")

    name: str = Field(
        min_length=1,
        max_length=MAX_RUN_NAME,
        pattern=DNS_LABEL,
        description=f"Run name: a DNS label of at most {MAX_RUN_NAME} characters (Job names derive from it).",
    )
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL, description="Namespace.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


class VisionR1Run(Schema):
    """A Vision-R1 run: bridge -> SFT -> PTST (GRPO) stages -> eval."""

    api_version: Literal["visionr1.io/v1alpha1"] = Field(
        alias="apiVersion", description="visionr1.io/v1alpha1"
    )
    kind: Literal["VisionR1Run"] = Field(description="VisionR1Run")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: VisionR1RunSpec = Field(description="Desired state.")
    status: VisionR1RunStatus | None = Field(default=None, description="Observed state.")

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"
