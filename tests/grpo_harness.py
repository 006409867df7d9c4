"""Shared set-up for GRPO tests: a colour task with known answers and a warmed-up tiny model.

The task: "What color is the image?" on a solid 56x56 image of one of four colours,
answered with the colour's name. The warm-up is a few seconds of supervised training
on the output format where only ``correct_fraction`` of the targets name the right
colour (the rest a random one): the model then knows the format and is right more
often than chance but far from always, which leaves GRPO something to learn.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import torch
from PIL import Image

from visionr1_trainer.data.formats import rl_row, write_rows
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.tiny import build_tiny_vlm
from visionr1_trainer.models.vlm import IMAGE_TOKEN, encode_prompts, mm_token_types

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
QUESTION = "<image>What color is the image? Answer with a color."


def write_color_task(directory: Path, per_color: int = 8) -> Path:
    """RL rows (geometry3k format) with one PNG per colour; returns the jsonl path."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLORS.items():
        image = directory / f"{name}.png"
        Image.new("RGB", (56, 56), rgb).save(image)
        rows += [rl_row(f"{name}-{i}", QUESTION, name, [str(image)]) for i in range(per_color)]
    return write_rows(rows, directory / "rl.jsonl")


def build_warm_model(directory: Path, correct_fraction: float = 0.7, steps: int = 80, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL that knows the format and is right about ``correct_fraction`` of the time."""
    build_tiny_vlm(directory, corpus=[f"Final Answer: {c}" for c in COLORS], seed=seed)
    model, tok, ip = load_vlm(str(directory), "float32")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    names = list(COLORS)
    images = {c: Image.new("RGB", (56, 56), rgb) for c, rgb in COLORS.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    image_token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for _ in range(steps):
        colors = [rng.choice(names) for _ in range(16)]
        enc = encode_prompts(tok, ip, [QUESTION] * 16, [[images[c]] for c in colors], 64)
        targets = [
            f"<think>I see it.</think><answer> Final Answer:{c if rng.random() < correct_fraction else rng.choice(names)} </answer><|im_end|>"
            for c in colors
        ]
        tgt = tok(targets, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        ids = torch.cat([enc.input_ids, tgt.input_ids], 1)
        labels = torch.cat([torch.full_like(enc.input_ids, -100), tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)], 1)
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([enc.attention_mask, tgt.attention_mask], 1),
            pixel_values=enc.pixel_values,
            image_grid_thw=enc.image_grid_thw,
            mm_token_type_ids=mm_token_types(ids, image_token),
            labels=labels,
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(directory)
    return directory


def grpo_config(tmp: Path, model_dir: Path, data: Path, stage: str = "ptst-1", index: int = 1,
                init_uri: str | None = None, steps: int = 4, **grpo) -> dict:
    """A GRPO stage config document (the JSON the operator would render)."""
    settings = {
        "learningRate": 1e-3, "rolloutBatchSize": 8, "microBatchSize": 64, "beta": 0.01, "warmupSteps": 0,
        "maxPromptLength": 64, "rolloutBackend": "hf", "deepspeedZeroStage": 0, "saveEverySteps": 2,
        "temperature": 1.0, **grpo,
    }
    return {
        "kind": "grpo",
        "run": "t",
        "namespace": "default",
        "stage": stage,
        "outputUri": f"file://{tmp}/store/default/t/{stage}",
        "storage": {"uri": f"file://{tmp}/store"},
        "model": {"name": f"file://{model_dir}", "dtype": "float32"},
        "metricsPort": 0,
        "terminationMessagePath": str(tmp / f"{stage}.termination"),
        "ptstIndex": index,
        "ptstTotal": 2,
        "initUri": init_uri,
        "data": {"source": str(data)},
        "ptst": {"maxCompletionLength": 24, "numGenerations": 4, "steps": steps},
        "grpo": settings,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
