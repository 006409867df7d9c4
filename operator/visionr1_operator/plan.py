"""Spec -> the ordered stage plans of a run. Pure: no I/O, no kopf, no Kubernetes.

Both executors consume this list: the operator turns each plan into a ConfigMap and a
Job (``cluster/jobs.py``), the local executor into a subprocess. Artifact locations are fixed
by the plan (``<storage>/<namespace>/<run>/<stage>``), so every stage's inputs are known
before anything runs and a restarted stage finds its own checkpoints again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from visionr1_trainer.config import (
    BridgeSettings,
    BridgeStageConfig,
    EvalSettings,
    EvalStageConfig,
    GRPOSettings,
    GRPOStageConfig,
    Schema,
    SFTSettings,
    SFTStageConfig,
    StageContext,
    artifact_uri,
)

from . import __version__
from .api import Resources, StageControl, VisionR1Run
from .pod_settings import PodSettings

DEFAULT_TRAINER_IMAGE = f"visionr1/trainer:{__version__}"


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run, ready to be executed by either executor."""

    name: str  # bridge, sft, ptst-1 ... ptst-N, eval
    kind: str  # the trainer entrypoint: bridge, sft, grpo, eval
    config: StageContext  # what `python -m visionr1_trainer <kind> --config` receives
    resources: Resources
    image: str
    backoff_limit: int
    active_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    pod: PodSettings = field(default_factory=PodSettings)  # extra labels, env, volumes... (api.PodSettings)

    @property
    def output_uri(self) -> str:
        return self.config.output_uri

    def for_attempt(self, attempt: int) -> StagePlan:
        """The same stage, configured for its ``attempt``-th try (1-based)."""
        return replace(self, config=self.config.model_copy(update={"attempt": attempt}))

    def config_json(self) -> dict[str, Any]:
        return self.config.to_json_dict()


def _narrow(settings_cls: type[Schema], stage: StageControl) -> Schema:
    """The trainer-side settings held by a stage spec (which also has resources etc.)."""
    fields = set(settings_cls.model_fields)
    return settings_cls.model_validate(
        {settings_cls.model_fields[f].alias or f: getattr(stage, f) for f in fields}
    )


def build_plan(run: VisionR1Run, default_image: str = DEFAULT_TRAINER_IMAGE) -> list[StagePlan]:
    """The enabled stages of ``run``, in execution order."""
    spec, stages = run.spec, run.spec.stages
    context = {
        "run": run.name,
        "namespace": run.namespace,
        "storage": spec.storage,
        "model": spec.model,
    }

    def uri(stage_name: str) -> str:
        return artifact_uri(spec.storage.uri, run.namespace, run.name, stage_name)

    def make(name: str, kind: str, control: StageControl, config: StageContext) -> StagePlan:
        return StagePlan(
            name=name,
            kind=kind,
            config=config,
            resources=control.resources,
            image=control.resources.image or spec.image or default_image,
            backoff_limit=control.backoff_limit,
            active_deadline_seconds=control.active_deadline_seconds,
            ttl_seconds_after_finished=control.ttl_seconds_after_finished,
            pod=control.pod,
        )

    plans: list[StagePlan] = []
    if stages.bridge.enabled:
        plans.append(make("bridge", "bridge", stages.bridge, BridgeStageConfig(
            **context, stage="bridge", output_uri=uri("bridge"),
            source=spec.data.bridge_source, bridge=_narrow(BridgeSettings, stages.bridge),
        )))
    # The latest trained model so far; None means the base model.
    trained: dict[str, str] = {}
    if stages.sft.enabled:
        data_source = (
            {"data_uri": uri("bridge")} if stages.bridge.enabled else {"data": spec.data.cold_start}
        )
        plans.append(make("sft", "sft", stages.sft, SFTStageConfig(
            **context, stage="sft", output_uri=uri("sft"),
            sft=_narrow(SFTSettings, stages.sft), **data_source,
        )))
        trained["sft"] = uri("sft")
    if stages.grpo.enabled:
        grpo = _narrow(GRPOSettings, stages.grpo)
        for i, ptst in enumerate(stages.ptst, start=1):
            name = f"ptst-{i}"
            init = list(trained.values())[-1] if trained else None
            plans.append(make(name, "grpo", stages.grpo, GRPOStageConfig(
                **context, stage=name, output_uri=uri(name), ptst_index=i,
                ptst_total=len(stages.ptst), init_uri=init, cold_start_uri=trained.get("sft"), data=spec.data.rl,
                ptst=ptst, grpo=grpo, validation_benchmark=_validation_benchmark(run),
            )))
            trained[name] = uri(name)
    if stages.eval.enabled:
        plans.append(make("eval", "eval", stages.eval, EvalStageConfig(
            **context, stage="eval", output_uri=uri("eval"),
            models=_models_to_score(trained, stages.eval.include_baselines),
            benchmarks=_selected_benchmarks(run),
            eval=_narrow(EvalSettings, stages.eval),
        )))
    return plans


def _models_to_score(trained: dict[str, str], include_baselines: bool) -> dict[str, str]:
    if include_baselines:
        return {"base": "base", **trained}
    if not trained:
        return {"base": "base"}
    last = list(trained)[-1]
    return {last: trained[last]}


def _validation_benchmark(run: VisionR1Run):
    """The benchmark ``stages.grpo.validation.benchmark`` names, if any (checked by the spec)."""
    named = run.spec.stages.grpo.validation.benchmark
    return next((b for b in run.spec.data.benchmarks if b.name == named), None) if named else None


def _selected_benchmarks(run: VisionR1Run):
    wanted = run.spec.stages.eval.benchmarks
    every = run.spec.data.benchmarks
    return [b for b in every if not wanted or b.name in wanted]


def config_strings(value: Any):
    """Every string in a stage config's JSON (nested dicts and lists): where it names URIs,
    PVC claims and other stages' outputs."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from config_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from config_strings(v)
