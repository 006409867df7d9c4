"""Inputs of the local demo (examples/tiny-cpu.yaml): a tiny base model and synthetic data.

Nothing can be downloaded, so the demo's "base model" is a tiny Qwen2.5-VL built from a
config (tokenizer trained locally on the task's text), given a short fixed pretraining
on a separate split of rendered images (captions and direct answers, ``pretrain``) so
that, like the paper's Qwen2.5-VL-7B-Instruct, it can see before any cold start. Its
data are rendered images with known answers. ``python -m visionr1_trainer.demo DIR`` writes

    DIR/base-model/                    the tiny model, tokenizer, image processor, pretraining.json
    DIR/bridge-source.jsonl            image/question/answer rows for Modality Bridging
    DIR/cold-start.jsonl, rl.jsonl     (cold-start rows are not used: the bridge makes them)
    DIR/eval.jsonl                     a disjoint evaluation split
    DIR/images/, DIR/pretrain-images/

and does nothing when they are already there, made with the same settings (the
pretraining's settings and seed are kept in ``base-model/pretraining.json``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from . import pretrain as base_pretraining
from .data.synthetic import generate, tokenizer_corpus
from .models.tiny import build_tiny_vlm

# "Which color is the largest shape?": its teacher overthinks (data.reflect).
DEMO_TASKS = ("largest",)
DEMO_SAMPLES = 384


def prepare(directory: str | Path, n: int = DEMO_SAMPLES, seed: int = 0, tasks=DEMO_TASKS,
            n_eval: int | None = None, pretraining: dict[str, Any] | None = None, log=print) -> Path:
    """Write the inputs (``n`` training rows, ``n_eval`` held-out ones, by default n / 3).

    ``pretraining``: overrides of ``pretrain.PRETRAIN`` (tests run a few steps); the base
    model is rebuilt when the one there was pretrained otherwise.
    """
    directory = Path(directory)
    model = directory / "base-model"
    if ((model / "config.json").exists() and (directory / "eval.jsonl").exists()
            and base_pretraining.is_pretrained(model, seed, pretraining)):
        return directory
    generate(directory, n=n, seed=seed, tasks=tasks, n_eval=max(8, n // 3) if n_eval is None else n_eval)
    if model.exists():
        shutil.rmtree(model)
    corpus = tokenizer_corpus(tasks, seed=seed) + base_pretraining.corpus(seed)
    build_tiny_vlm(model, corpus=corpus, seed=seed)
    base_pretraining.pretrain(model, seed, directory / "pretrain-images", pretraining, log=log)
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
