"""The demo's base model: a tiny "pretrained instruct model" that can already see.

The paper starts from Qwen2.5-VL-7B-Instruct, a model that perceives and answers
(MathVista 68.1) before any cold start; Vision-R1's cold-start SFT then teaches it to
*reason*, and PTST fixes how long. The demo's tiny Qwen2.5-VL starts from random
weights, and a 2-layer model cannot learn to see from the cold-start set's few hundred
chains, most of whose tokens are reflection (issue 15: every row stayed at chance). So
``demo.prepare`` gives it the instruct model's two skills first, on a *separate* split
of rendered images (``pretrain``, never the training, RL or eval split):

* captions: "Describe the image." -> "A large red circle and a small blue square.";
* short direct answers to the task's question, as an instruct model answers:
  "The largest shape is the red circle; the blue square is smaller. The answer is (A)."

No reasoning, no ``<think>``, no reflection: what cold-start SFT teaches is left to it.
A fixed number of steps (``PRETRAIN``), the same for every seed and every row, with
the seed fixing the images' order and the initial weights: deterministic per seed on a
machine (one CPU thread, whatever the machine's cores: the sums' order, hence the
weights, do not depend on them, and a thread does not spin against the other
processes of a loaded machine). ``perception`` (the share of held-out images, split ``pretrain-check``, whose
larger shape's colour the model ranks first after "The largest shape is the") is
written with the settings to ``base-model/pretraining.json``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from .data import reflect

# The base model's pretraining (issue 15's experiments: 600 steps of 16 at 2e-3 gave
# 88% perception on seed 0; 300 steps 35%, answers alone without captions 23-35%).
PRETRAIN = {"samples": 2048, "steps": 600, "batch_size": 16, "learning_rate": 2.0e-3, "warmup_steps": 20,
            "check_samples": 128, "version": 2}
INFO = "pretraining.json"


def caption(scene: dict[str, Any]) -> str:
    big, small = scene["large"], scene["small"]
    return f"A large {big['color']} {big['shape']} and a small {small['color']} {small['shape']}."


def direct_answer(scene: dict[str, Any], letter: str) -> str:
    big, small = scene["large"], scene["small"]
    return (f"The largest shape is the {big['color']} {big['shape']}; the {small['color']} {small['shape']} "
            f"is smaller. The answer is ({letter}).")


def corpus(seed: int, n: int = 8) -> list[str]:
    """Pretraining texts of a few samples, for the tokenizer."""
    from .data.synthetic import make_sample

    out = ["Describe the image."]
    for i in range(n):
        s = make_sample("largest", seed, "corpus", i, 28)
        out += [caption(s.scene), direct_answer(s.scene, s.answer)]
    return out


def _sample(seed: int, split: str, i: int, images: Path):
    from .data.synthetic import make_sample

    s = make_sample("largest", seed, split, i)
    path = images / f"{s.id}.png"
    s.image.save(path, format="PNG")
    return s, str(path)


def _examples(seed: int, n: int, images: Path):
    from .data.formats import ColdExample

    out = []
    for i in range(n):
        s, path = _sample(seed, "pretrain", i, images)
        if i % 2 == 0:
            turns = [{"role": "user", "content": s.question},
                     {"role": "assistant", "content": direct_answer(s.scene, s.answer)}]
        else:
            turns = [{"role": "user", "content": "Describe the image."},
                     {"role": "assistant", "content": caption(s.scene)}]
        out.append(ColdExample(s.id, turns, [path]))
    return out


def perception(model, tokenizer, image_processor, seed: int, n: int, images: Path) -> float:
    """Share of held-out images whose larger shape's colour the model ranks first."""
    import torch

    from .data.formats import ColdExample
    from .sft.batches import collate, load_group
    from .sft.data import encode_example

    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    colours = [tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in reflect.COLOR_CHOICES]
    right = 0
    model.eval()
    with torch.no_grad():
        for i in range(n):
            s, path = _sample(seed, "pretrain-check", i, images)
            turns = [{"role": "user", "content": s.question},
                     {"role": "assistant", "content": "The largest shape is the"}]
            group = load_group([encode_example(ColdExample(s.id, turns, [path]), tokenizer, image_processor, 512)],
                               image_processor)
            end = len(group["input_ids"]) - 2  # before the turn's closing <|im_end|>\n
            group["input_ids"], group["labels"] = group["input_ids"][:end], group["labels"][:end]
            logits = model(**collate([group], tokenizer.pad_token_id, image_id).inputs).logits[0, -1]
            right += reflect.COLOR_CHOICES[int(torch.argmax(logits[colours]))] == s.scene["large"]["color"]
    return right / n


def settings(seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    unknown = set(overrides or {}) - set(PRETRAIN)
    if unknown:
        raise ValueError(f"unknown pretraining setting(s): {', '.join(sorted(unknown))}")
    return {**PRETRAIN, **(overrides or {}), "seed": seed}


def is_pretrained(model_dir: Path, seed: int, overrides: dict[str, Any] | None = None) -> bool:
    """Whether ``model_dir`` holds a base model pretrained with exactly these settings."""
    try:
        return json.loads((model_dir / INFO).read_text())["settings"] == settings(seed, overrides)
    except (OSError, ValueError, KeyError):
        return False


def pretrain(model_dir: str | Path, seed: int, work: str | Path, overrides: dict[str, Any] | None = None,
             log=print) -> dict[str, Any]:
    """Pretrain the tiny model saved in ``model_dir`` in place (see the module docstring)."""
    import torch

    model_dir, images = Path(model_dir), Path(work)
    images.mkdir(parents=True, exist_ok=True)
    cfg = settings(seed, overrides)
    start = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(model_dir, images, seed, cfg, start, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model_dir: Path, images: Path, seed: int, cfg: dict[str, Any], start: float, log) -> dict[str, Any]:
    import torch

    from .models.loading import load_vlm
    from .sft.batches import collate, load_group
    from .sft.data import encode_example
    from .sft.train import token_loss_sum

    model, tokenizer, image_processor = load_vlm(str(model_dir), dtype="float32")
    groups = [load_group([encode_example(e, tokenizer, image_processor, 512)], image_processor)
              for e in _examples(seed, cfg["samples"], images)]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    rng, order, losses = random.Random(seed), [], []
    model.train()
    for step in range(cfg["steps"]):
        if len(order) < cfg["batch_size"]:
            more = list(range(len(groups)))
            rng.shuffle(more)
            order += more
        picked, order = order[:cfg["batch_size"]], order[cfg["batch_size"]:]
        batch = collate([groups[i] for i in picked], tokenizer.pad_token_id, image_id)
        lr = cfg["learning_rate"] * min(1.0, (step + 1) / cfg["warmup_steps"]) * (1 - step / cfg["steps"]) ** 0.5
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = token_loss_sum(model(**batch.inputs).logits, batch.labels) / max(1, batch.target_tokens)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"pretraining the base model: step {step + 1}/{cfg['steps']} loss {losses[-1]:.3f}")
    seen = perception(model, tokenizer, image_processor, seed, cfg["check_samples"], images)
    model.save_pretrained(model_dir)
    info = {"settings": cfg, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "perception": round(seen, 4), "seconds": round(time.monotonic() - start, 1)}
    (model_dir / INFO).write_text(json.dumps(info, indent=1) + "\n")
    log(f"pretrained base model: perception {seen:.1%} on {cfg['check_samples']} held-out images "
        f"({info['seconds']} s)")
    return info
