"""Inputs of the local demo (examples/tiny-cpu.yaml): a tiny base model and synthetic data.

Nothing can be downloaded, so the demo's "base model" is a tiny Qwen2.5-VL built from a
config (random weights, tokenizer trained locally on the task's text) and its data
are rendered images with known answers. ``python -m visionr1_trainer.demo DIR`` writes

    DIR/base-model/                    the tiny model, tokenizer and image processor
    DIR/bridge-source.jsonl            image/question/answer rows for Modality Bridging
    DIR/cold-start.jsonl, rl.jsonl     (cold-start rows are not used: the bridge makes them)
    DIR/eval.jsonl                     a disjoint evaluation split
    DIR/images/

and does nothing when they are already there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .data.synthetic import generate, tokenizer_corpus
from .models.tiny import build_tiny_vlm

# "Which color is the largest shape?": learnable from pixels by a tiny model within the
# demo's minutes without saturating, and its teacher overthinks (data.reflect).
DEMO_TASKS = ("largest",)
DEMO_SAMPLES = 384


def prepare(directory: str | Path, n: int = DEMO_SAMPLES, seed: int = 0, tasks=DEMO_TASKS,
            n_eval: int | None = None) -> Path:
    """Write the inputs (``n`` training rows, ``n_eval`` held-out ones, by default n / 3)."""
    directory = Path(directory)
    model = directory / "base-model"
    if (model / "config.json").exists() and (directory / "eval.jsonl").exists():
        return directory
    generate(directory, n=n, seed=seed, tasks=tasks, n_eval=max(8, n // 3) if n_eval is None else n_eval)
    build_tiny_vlm(model, corpus=tokenizer_corpus(tasks, seed=seed), seed=seed)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--samples", type=int, default=DEMO_SAMPLES, help="training samples")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples (default: a third)")
    parser.add_argument("--seed", type=int, default=0, help="data and model initialisation seed")
    args = parser.parse_args()
    print(prepare(args.directory, args.samples, args.seed, n_eval=args.eval_samples))


if __name__ == "__main__":
    main()
