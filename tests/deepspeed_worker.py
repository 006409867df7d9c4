"""One rank of the DeepSpeed tests: runs a list of jobs in one process, under torchrun.

Starting DeepSpeed (imports, process group, engine) costs seconds per process, so the
tests start two ranks once and give them every job: whole SFT and GRPO stages (their
``train_stage``, exactly as ``python -m visionr1_trainer`` runs them, minus the process
start) and probes that look at one engine behaviour. Each job's result (or error) goes
to ``<out>/<job>.rank<r>.json``; a job that fails does not stop the next.

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py plan.json out/
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch


def run_stage(job: dict, env) -> dict:
    """A whole SFT or GRPO stage on these ranks; its summary."""
    from visionr1_trainer.config import STAGE_CONFIGS
    from visionr1_trainer.metrics import METRICS_LOG, StageMetrics
    from visionr1_trainer.runtime import work_dir

    config = STAGE_CONFIGS[job["config"]["kind"]].model_validate(job["config"])
    stage = importlib.import_module(f"visionr1_trainer.{job['config']['kind']}.train"
                                    if job["config"]["kind"] == "sft" else "visionr1_trainer.grpo.trainer")
    work = work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    metrics = StageMetrics(config.run, config.stage, 0, work / METRICS_LOG if env.is_main else None).start()
    try:
        return stage.train_stage(config, env, work, metrics)
    finally:
        metrics.close()


def probe_partitioned_loading(job: dict, env) -> dict:
    """ZeRO-3: is each weight partitioned as it loads, and what share does this rank hold?"""
    from visionr1_trainer.grpo.engine import EngineSpec, make_engine
    from visionr1_trainer.models.loading import load_model, load_model_config

    seen = {}

    def load():
        model = load_model(job["model"], "float32")
        seen["partitioned_at_load"] = all(hasattr(p, "ds_tensor") for p in model.parameters())
        return model

    engine = make_engine(load, lambda: load_model_config(job["model"]), env, EngineSpec(3, "fp32", 2, 1.0, 1e-3))
    params = list(engine._module.parameters())
    held = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    full = dict(engine.iter_full_parameters())  # consumed at once: only shapes are kept below
    return {**seen, "held": held, "total": total, "full_numel": sum(t.numel() for t in full.values()),
            "describe": engine.describe()}


def probe_uneven_rollout(job: dict, env) -> dict:
    """HF rollouts under ZeRO-3 with ranks that stop at different lengths (rank r: 4 + 8r tokens)."""
    from PIL import Image

    from visionr1_trainer.grpo.engine import EngineSpec, make_engine
    from visionr1_trainer.grpo.rollout import HFRollout, SamplingSettings
    from visionr1_trainer.models.loading import load_model, load_model_config, load_processor_parts
    from visionr1_trainer.models.vlm import encode_prompts

    tokenizer, processor = load_processor_parts(job["model"])
    engine = make_engine(lambda: load_model(job["model"], "float32"), lambda: load_model_config(job["model"]),
                         env, EngineSpec(3, "fp32", 2, 1.0, 1e-3))
    prompts = encode_prompts(tokenizer, processor, ["What color is the image?"] * (1 + env.rank),
                             [[Image.new("RGB", (56, 56), "red")]] * (1 + env.rank), 64)
    rollout = HFRollout(engine, tokenizer)
    torch.manual_seed(env.rank)
    out = rollout.generate(prompts, [1] * (1 + env.rank), SamplingSettings(2, 4 + 8 * env.rank, 1.0))
    # ...and the engine still trains after the rollout gave the weights back.
    ids = out.completion_ids[:1].clone()
    engine.zero_grad()
    engine.backward(engine(input_ids=ids, labels=ids).loss, last=True)
    engine.step()
    return {"width": out.completion_ids.shape[1], "rows": out.completion_ids.shape[0]}


def probe_replicas(job: dict, env) -> dict:
    """What verify_replicas_identical says under ZeRO-2 (replicas) and ZeRO-3 (partitions)."""
    from visionr1_trainer.grpo.engine import EngineSpec, make_engine
    from visionr1_trainer.models.loading import load_model, load_model_config

    out = {}
    for stage in (2, 3):
        engine = make_engine(lambda: load_model(job["model"], "float32"), lambda: load_model_config(job["model"]),
                             env, EngineSpec(stage, "fp32", 2, 1.0, 1e-3))
        out[f"zero{stage}"] = engine.verify_replicas_identical()
        if stage == 2:
            with torch.no_grad():  # rank 1 drifts: the check must see it
                next(engine._module.parameters()).add_(float(env.rank))
            try:
                engine.verify_replicas_identical()
                out["zero2_drift"] = "not detected"
            except RuntimeError as exc:
                out["zero2_drift"] = str(exc)
    return out


def probe_accumulation(job: dict, env) -> dict:
    """Gradient norm of 2 accumulated micro-batches per rank under ZeRO 1, 2, 3, and the
    one plain torch computes for the same 4 rows per rank in one pass."""
    from visionr1_trainer.grpo.engine import EngineSpec, make_engine
    from visionr1_trainer.models.loading import load_model, load_model_config

    torch.manual_seed(0)
    ids = torch.randint(10, 300, (8, 12))[4 * env.rank: 4 * env.rank + 4]  # this rank's 4 rows
    out = {}
    for stage in (0, 1, 2, 3):
        engine = make_engine(lambda: load_model(job["model"], "float32"), lambda: load_model_config(job["model"]),
                             env, EngineSpec(stage, "fp32", 2, 1e9, 1e-3))  # no clipping: the norm is raw
        engine.zero_grad()
        for index, rows in enumerate((ids[:2], ids[2:])):
            engine.backward(engine(input_ids=rows, labels=rows).loss * 0.5, last=index == 1)
        out[f"zero{stage}"] = float(engine.step())
        out[f"zero{stage}_saved"] = len(engine.full_state_dict())
    return out


JOBS = {"stage": run_stage, "accumulation": probe_accumulation, "partitioned_loading": probe_partitioned_loading,
        "uneven_rollout": probe_uneven_rollout, "replicas": probe_replicas}


def main(plan_path: str, out_dir: str) -> int:
    from visionr1_trainer.distributed import barrier, init_distributed

    env = init_distributed(timeout_minutes=float(os.environ.get("DS_TEST_TIMEOUT_MINUTES", "3")))
    out = Path(out_dir)
    for job in json.loads(Path(plan_path).read_text()):
        try:
            result = {"ok": True, "result": JOBS[job["job"]](job, env)}
        except BaseException as exc:  # recorded; the next job still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        (out / f"{job['name']}.rank{env.rank}.json").write_text(json.dumps(result, default=str))
        barrier(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
