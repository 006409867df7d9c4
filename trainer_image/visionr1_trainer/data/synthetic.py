"""Synthetic visual math with exactly known answers, rendered with Pillow.

Nothing can be downloaded in the tests or the local demo, so they use these tasks:

* ``color``: one large solid shape; "What color is the shape?" with fixed choices
  (A) red (B) green (C) blue (D) yellow. A tiny VLM trained from scratch on CPU learns
  it from pixels in minutes: this is the task the demo shows learning on.
* ``count``: 1-6 shapes in a 3x3 layout; "How many shapes are in the image?" (numeric).
* ``bar``: a bar chart on a unit grid; "What is the value of the tallest bar?" (numeric).
* ``angle``: two rays from a vertex; the angle's measure in degrees (multiple choice).
* ``length``: a segment on a unit grid; its length (numeric).
* ``largest``: two shapes; "Which color is the largest shape?" (fixed choices as for
  ``color``). Its teacher reflects at varied length and is less often right on long
  chains (``data.reflect``): the task of the demo and of the ablation (bench/ablation.py).

Every sample is a pure function of ``(seed, split, index)``, so a generated set is the
same byte for byte on every machine. Each sample carries its ``scene`` (the ground
truth as JSON), from which the rule-based teacher (``teacher_*`` below, used by the
bridge stage's ``rule`` backend) writes descriptions and reasoning with self-checks.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import reflect
from .formats import bridge_row, cold_row, format_response, rl_row, write_rows

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (240, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
COLOR_CHOICES = ["red", "green", "blue", "yellow"]  # fixed order: the letter follows the color
SHAPES = ["circle", "square", "triangle"]
LETTERS = "ABCDE"
ANGLES = [30, 45, 60, 90, 120, 135, 150]
TASKS = ("color", "count", "bar", "angle", "length")  # the default mix of ``generate``
DEFAULT_IMAGE_SIZE = 56  # the tiny model's image side: 4 image tokens


@dataclass(frozen=True)
class Sample:
    """One generated problem: its image, question, exact answer and scene."""

    id: str
    task: str
    question: str
    answer: str
    scene: dict[str, Any]
    image: Any  # PIL.Image.Image


# --- drawing ------------------------------------------------------------------------------


def _canvas(size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _shape(draw, shape: str, box: tuple[int, int, int, int], color: str) -> None:
    x0, y0, x1, y1 = box
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _choices(rng: random.Random, correct: Any, pool: Sequence[Any], k: int = 4) -> list[Any]:
    options = [correct] + rng.sample([p for p in pool if p != correct], k - 1)
    rng.shuffle(options)
    return options


def _choice_text(options: Sequence[Any], suffix: str = "") -> str:
    return " ".join(f"({LETTERS[i]}) {o}{suffix}" for i, o in enumerate(options))


# --- the tasks: (rng, size) -> (question, answer, scene, image) --------------------------


def make_color(rng: random.Random, size: int):
    shape, color = rng.choice(SHAPES), rng.choice(COLOR_CHOICES)
    side = rng.randint(int(size * 0.6), int(size * 0.8))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    img, draw = _canvas(size)
    _shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), color)
    question = (f"What color is the shape?\nChoices: {_choice_text(COLOR_CHOICES)}\n"
                "Answer with the option's letter.")
    letter = LETTERS[COLOR_CHOICES.index(color)]
    return question, letter, {"task": "color", "shape": shape, "color": color,
                              "choices": COLOR_CHOICES}, img


def make_count(rng: random.Random, size: int):
    count = rng.randint(1, 6)
    cells = sorted(rng.sample(range(9), count))
    cell = size // 3
    img, draw = _canvas(size)
    shapes = []
    for c in cells:
        row, col = divmod(c, 3)
        side = rng.randint(int(cell * 0.55), int(cell * 0.8))
        x0 = col * cell + rng.randint(0, cell - side)
        y0 = row * cell + rng.randint(0, cell - side)
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        _shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), color)
        shapes.append({"shape": shape, "color": color, "row": row, "col": col})
    question = "How many shapes are in the image?\nAnswer with a number."
    return question, str(count), {"task": "count", "shapes": shapes}, img


def make_bar(rng: random.Random, size: int):
    bars = rng.randint(3, 4)
    values = [rng.randint(1, 8) for _ in range(bars)]
    unit, base = (size - 8) // 8, size - 4
    img, draw = _canvas(size)
    for v in range(1, 9):  # the unit grid the values are read against
        draw.line([(2, base - v * unit), (size - 2, base - v * unit)], fill=(200, 200, 200))
    width = (size - 8) // bars
    for i, value in enumerate(values):
        x0 = 4 + i * width + 1
        draw.rectangle((x0, base - value * unit, x0 + width - 3, base), fill=COLORS["blue"])
    draw.line([(2, base), (size - 2, base)], fill=(0, 0, 0))
    question = (f"The bar chart has {bars} bars on a grid where each line is one unit. "
                "What is the value of the tallest bar?\nAnswer with a number.")
    return question, str(max(values)), {"task": "bar", "values": values}, img


def make_angle(rng: random.Random, size: int):
    degrees = rng.choice(ANGLES)
    options = _choices(rng, degrees, ANGLES)
    cx, cy, r = size // 2, size * 3 // 4, size * 0.4
    img, draw = _canvas(size)
    end = (cx + r * math.cos(math.radians(degrees)), cy - r * math.sin(math.radians(degrees)))
    draw.line([(cx, cy), (cx + r, cy)], fill=(0, 0, 0), width=2)
    draw.line([(cx, cy), end], fill=(0, 0, 0), width=2)
    question = ("What is the measure of the angle between the two rays, in degrees?\n"
                f"Choices: {_choice_text(options)}\nAnswer with the option's letter.")
    letter = LETTERS[options.index(degrees)]
    return question, letter, {"task": "angle", "degrees": degrees, "choices": options}, img


def make_length(rng: random.Random, size: int):
    unit = size // 7
    length = rng.randint(1, 6)
    horizontal = rng.random() < 0.5
    start = [rng.randint(0, 6 - length), rng.randint(0, 6)]
    img, draw = _canvas(size)
    for k in range(8):
        draw.line([(k * unit, 0), (k * unit, 7 * unit)], fill=(210, 210, 210))
        draw.line([(0, k * unit), (7 * unit, k * unit)], fill=(210, 210, 210))
    a, b = start
    x0, y0, x1, y1 = (a, b, a + length, b) if horizontal else (b, a, b, a + length)
    draw.line([(x0 * unit, y0 * unit), (x1 * unit, y1 * unit)], fill=COLORS["red"], width=2)
    question = ("The grid squares have side 1. How long is the red segment?\n"
                "Answer with a number.")
    scene = {"task": "length", "length": length,
             "orientation": "horizontal" if horizontal else "vertical"}
    return question, str(length), scene, img


MAKERS: dict[str, Callable] = {
    "color": make_color, "count": make_count, "bar": make_bar, "angle": make_angle,
    "length": make_length, "largest": reflect.make_largest,
}


def make_sample(task: str, seed: int, split: str, index: int, size: int = DEFAULT_IMAGE_SIZE) -> Sample:
    """The ``index``-th sample of ``task`` in ``split``: a pure function of its arguments."""
    if task not in MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(MAKERS)}")
    rng = random.Random(f"visionr1-synthetic/{seed}/{split}/{task}/{index}")
    question, answer, scene, image = MAKERS[task](rng, size)
    return Sample(f"{split}-{task}-{index:06d}", task, question, answer, scene, image)


# --- the rule-based teacher ------------------------------------------------------------------


def teacher_description(scene: dict[str, Any]) -> str:
    """A detailed text description of the image, from the scene (bridging step 2)."""
    task = scene["task"]
    if task == "color":
        return f"The image shows a single {scene['color']} {scene['shape']} on a white background."
    if task == "count":
        parts = [f"{_a(s['color'])} {s['shape']} in row {s['row'] + 1}, column {s['col'] + 1}"
                 for s in scene["shapes"]]
        return "The image shows shapes on a white background: " + "; ".join(parts) + "."
    if task == "bar":
        values = ", ".join(f"bar {i + 1} reaches {v}" for i, v in enumerate(scene["values"]))
        return f"A bar chart with {len(scene['values'])} blue bars on a unit grid: {values}."
    if task == "angle":
        return (f"Two black rays start at one vertex; one points right, the other is rotated "
                f"{scene['degrees']} degrees counterclockwise from it.")
    if task == "length":
        return (f"A {scene['orientation']} red segment on a grid of unit squares spans "
                f"{scene['length']} squares.")
    if task == "largest":
        return reflect.describe_largest(scene)
    raise ValueError(f"unknown synthetic task {task!r}")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def teacher_pseudo_cot(scene: dict[str, Any], answer: str) -> str:
    """A short, formatted "pseudo-CoT" (bridging step 1): description, then the answer."""
    return f"Image: {teacher_description(scene)} Reasoning: reading the figure gives {answer}. Answer: {answer}"


def teacher_reasoning(scene: dict[str, Any]) -> tuple[str, str]:
    """(reasoning with self-checks, final answer) derived from the scene (bridging step 3).

    Right for every task but ``largest``, whose teacher may talk itself out of the
    right answer (``data.reflect``); the bridge's answer filter drops those.
    """
    return _REASONERS[scene["task"]](scene)


def _reason_color(scene):
    color, shape = scene["color"], scene["shape"]
    letter = LETTERS[scene["choices"].index(color)]
    return (f"The image shows one {shape}. Its color is {color}. Wait, let me check the color "
            f"again: the {shape} is filled with {color}. So the color is {color}, which is "
            f"option ({letter})."), letter


def _reason_count(scene):
    shapes = scene["shapes"]
    steps = " ".join(f"{i + 1}: {_a(s['color'])} {s['shape']}." for i, s in enumerate(shapes))
    rows = [sum(1 for s in shapes if s["row"] == r) for r in range(3)]
    check = " + ".join(str(n) for n in rows)
    n = len(shapes)
    return (f"Let me count the shapes one by one. {steps} That makes {n}. Wait, let me check by "
            f"rows: {check} = {n}. Yes, there are {n} shapes."), str(n)


def _reason_bar(scene):
    values = scene["values"]
    reads = " ".join(f"Bar {i + 1} reaches {v}." for i, v in enumerate(values))
    top = max(values)
    return (f"I read each bar against the grid. {reads} The largest is {top}. Hmm, let me "
            f"check that no bar is taller: {', '.join(str(v) for v in values)} are all at most "
            f"{top}. So the tallest bar has value {top}."), str(top)


def _reason_angle(scene):
    degrees, options = scene["degrees"], scene["choices"]
    letter = LETTERS[options.index(degrees)]
    kind = "acute" if degrees < 90 else "right" if degrees == 90 else "obtuse"
    return (f"One ray points right and the other is rotated {degrees} degrees. The angle is "
            f"{kind}. Wait, let me check it against the choices: {degrees} is {kind}, and it is "
            f"option ({letter})."), letter


def _reason_length(scene):
    n = scene["length"]
    return (f"The segment is {scene['orientation']}. I count the unit squares it spans: {n}. "
            f"Let me check by counting the grid lines it crosses: {n + 1} lines, so {n} units. "
            f"The length is {n}."), str(n)


_REASONERS: dict[str, Callable] = {
    "color": _reason_color, "count": _reason_count, "bar": _reason_bar,
    "angle": _reason_angle, "length": _reason_length, "largest": reflect.reason_largest,
}


def teacher_response(scene: dict[str, Any]) -> str:
    """The cold-start target the rule-based teacher writes for a scene."""
    reasoning, answer = teacher_reasoning(scene)
    return format_response(reasoning, answer)


# --- writing a set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSet:
    """The files ``generate`` wrote (paths inside ``root``)."""

    root: Path
    bridge_source: Path
    cold_start: Path
    rl: Path
    eval: Path
    num_train: int
    num_eval: int


def generate(out_dir: str | Path, n: int, seed: int = 0, tasks: Sequence[str] = TASKS,
             n_eval: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
             file_format: str = "jsonl") -> SyntheticSet:
    """Render ``n`` training and ``n_eval`` evaluation samples and write every format.

    Tasks take turns (sample ``i`` is ``tasks[i % len(tasks)]``). Written under
    ``out_dir``: ``images/``, ``bridge-source``, ``cold-start`` (with the rule-based
    teacher's reasoning, where it is right), ``rl`` (all three over the same training
    samples) and ``eval``
    (RL format, a disjoint split), each as ``.jsonl`` or ``.parquet``.
    """
    if file_format not in ("jsonl", "parquet"):
        raise ValueError(f"file_format must be 'jsonl' or 'parquet', got {file_format!r}")
    if n < 1 or not tasks:
        raise ValueError("need n >= 1 and at least one task")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_eval = max(8, n // 4) if n_eval is None else n_eval
    train = [_write_image(root, make_sample(tasks[i % len(tasks)], seed, "train", i, image_size))
             for i in range(n)]
    test = [_write_image(root, make_sample(tasks[i % len(tasks)], seed, "eval", i, image_size))
            for i in range(n_eval)]
    ext = f".{file_format}"
    return SyntheticSet(
        root=root,
        bridge_source=write_rows([_bridge(s, p) for s, p in train], root / f"bridge-source{ext}"),
        # Only the teacher's right answers, as the bridge's answer filter would keep.
        cold_start=write_rows([_cold(s, p) for s, p in train
                               if teacher_reasoning(s.scene)[1] == s.answer], root / f"cold-start{ext}"),
        rl=write_rows([_rl(s, p) for s, p in train], root / f"rl{ext}"),
        eval=write_rows([_rl(s, p) for s, p in test], root / f"eval{ext}"),
        num_train=n,
        num_eval=n_eval,
    )


def _write_image(root: Path, sample: Sample) -> tuple[Sample, str]:
    rel = f"images/{sample.id}.png"
    sample.image.save(root / rel, format="PNG")
    return sample, rel


def _bridge(s: Sample, image: str) -> dict:
    # The scene travels as a JSON string: its keys differ by task, which a parquet
    # column of one struct type could not hold.
    return bridge_row(s.id, image, s.question, s.answer, task=s.task, scene=json.dumps(s.scene))


def _cold(s: Sample, image: str) -> dict:
    return cold_row(s.id, s.question, teacher_response(s.scene), [image], task=s.task)


def _rl(s: Sample, image: str) -> dict:
    return rl_row(s.id, s.question, s.answer, [image], task=s.task)


def tokenizer_corpus(tasks: Sequence[str] = TASKS, per_task: int = 8, seed: int = 0) -> list[str]:
    """Questions and teacher responses of a few samples, to train a tiny tokenizer on."""
    texts = []
    for task in tasks:
        for i in range(per_task):
            s = make_sample(task, seed, "corpus", i, 28)
            texts += [s.question, teacher_response(s.scene), teacher_description(s.scene)]
    return texts
