"""GPU variant of the GRPO benchmark: the vllm rollout backend against the hf one.

Runs a few PTST steps of the real stage (``visionr1_trainer.grpo.trainer.run``) twice on
the same model and data, once per rollout backend, and reports seconds per step and
rollout/training tokens per second from the stage's own metrics log.

    python bench/grpo_gpu.py --model /models/Qwen2.5-VL-3B-Instruct     # real weights on disk
    python bench/grpo_gpu.py --hidden 896 --layers 24                   # random 0.5B-class model

No hub access is assumed: without --model, a Qwen2.5-VL of the given size is built
from a config with random weights (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from visionr1_trainer.config import GRPOStageConfig
from visionr1_trainer.data.synthetic import generate
from visionr1_trainer.grpo.trainer import run
from visionr1_trainer.metrics import read_jsonl
from visionr1_trainer.models.tiny import build_tiny_vlm


def stage_config(tmp: Path, model: str, data: Path, backend: str, args) -> GRPOStageConfig:
    return GRPOStageConfig.model_validate({
        "run": "bench", "stage": f"ptst-{backend}", "outputUri": f"file://{tmp}/{backend}",
        "storage": {"uri": f"file://{tmp}"}, "model": {"name": model, "dtype": "bfloat16"},
        "metricsPort": 0, "terminationMessagePath": str(tmp / f"{backend}.summary"),
        "ptstIndex": 1, "ptstTotal": 1, "data": {"source": str(data)},
        "ptst": {"maxCompletionLength": args.max_len, "numGenerations": args.group, "steps": args.steps},
        "grpo": {"rolloutBackend": backend, "rolloutBatchSize": args.prompts, "microBatchSize": args.micro,
                 "deepspeedZeroStage": 0, "saveEverySteps": 10_000, "maxPromptLength": 1024},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Qwen2.5-VL directory (else a random one is built)")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--out", default="bench/results/grpo_gpu.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(build_tiny_vlm(tmp / "model", hidden_size=args.hidden, layers=args.layers, image_side=448))
    data = generate(tmp / "data", n=max(64, args.prompts * 4), seed=0, image_size=448).rl
    results = {}
    for backend in ("hf", "vllm"):
        cfg = stage_config(tmp, model, data, backend, args)
        run(cfg)
        steps = read_jsonl(tmp / backend / "_work" / "metrics.jsonl")[1:]  # first step warms up
        results[backend] = {
            key: round(statistics.median(s[key] for s in steps), 3)
            for key in ("step_seconds", "rollout_tokens_per_s", "train_tokens_per_s", "completion_length_mean")
        }
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.node(),
        "settings": vars(args),
        "results": results,
        "vllm_over_hf_rollout_tokens_per_s": round(
            results["vllm"]["rollout_tokens_per_s"] / results["hf"]["rollout_tokens_per_s"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
