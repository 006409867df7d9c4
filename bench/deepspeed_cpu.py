"""SFT and GRPO step time on 2 CPU ranks (gloo) under ZeRO 0 (torch) and ZeRO 3 (DeepSpeed).

Runs the stages' own ``train_stage`` through tests/deepspeed_worker.py (one torchrun for
all jobs), on the tiny Qwen2.5-VL of the tests, and prints the median step time of each
run after the first step (which includes warm-up). Results in BENCHMARKS.md.

    .venv/bin/python bench/deepspeed_cpu.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from grpo_harness import build_warm_model, write_color_task  # noqa: E402
from test_deepspeed_stages import grpo_doc, run_worker, sft_doc  # noqa: E402

from visionr1_trainer.data.synthetic import generate, tokenizer_corpus  # noqa: E402
from visionr1_trainer.metrics import read_jsonl  # noqa: E402
from visionr1_trainer.models.tiny import build_tiny_vlm  # noqa: E402


def step_seconds(log: Path, kind: str) -> list[float]:
    steps = read_jsonl(log)
    if kind == "grpo":
        return [s["step_seconds"] for s in steps]
    return [s["tokens"] / s["tokens_per_second"] for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepspeed_cpu.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="visionr1-ds-bench-"))
    grpo_model, color = build_warm_model(tmp / "warm"), write_color_task(tmp / "color")
    sft_model = build_tiny_vlm(tmp / "tiny", corpus=tokenizer_corpus(per_task=2))
    synthetic = generate(tmp / "synthetic", 24, seed=1, n_eval=1)
    figures: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        plan = []
        for stage in (0, 3):
            sft = sft_doc(tmp, sft_model, synthetic.cold_start, stage, f"sft-z{stage}-r{repeat}")
            sft["sft"]["epochs"] = 2
            grpo = grpo_doc(tmp, grpo_model, color, stage, f"grpo-z{stage}-r{repeat}")
            grpo["ptst"]["steps"] = 5
            plan += [{"job": "stage", "name": f"sft-z{stage}", "config": sft},
                     {"job": "stage", "name": f"grpo-z{stage}", "config": grpo}]
        proc = run_worker(plan, tmp / f"out-{repeat}")
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        for job in plan:
            name = job["config"]["stage"]
            kind = job["config"]["kind"]
            seconds = step_seconds(tmp / "store" / "default" / "t" / name / "_work" / "metrics.jsonl", kind)
            figures.setdefault(job["name"], []).append(statistics.median(seconds[1:]))
    summary = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v}
               for name, v in figures.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    for name, row in summary.items():
        print(f"{name:10s} median {row['median_s']:.3f} s/step (runs: {', '.join(f'{x:.3f}' for x in row['runs'])})")


if __name__ == "__main__":
    main()
