"""The ``largest`` task: the toy problem on which the paper's overthinking can appear.

Two shapes of different colours lie on a white canvas, one larger than the other;
"Which color is the largest shape?" with the fixed choices (A) red (B) green (C) blue
(D) yellow. The sizes are drawn so that the area ratio of the small shape to the large
one spreads over 0.15-0.75: some comparisons are easy at a glance, some are close
calls. A 2-layer model sees the image as 4 tokens, so it learns the easy ones and
stays unsure of the close ones: the task does not saturate.

The rule teacher (``reason_largest``) writes what the paper reports of DeepSeek-R1's
output on Vision-R1-cold: an answer, then self-reflection of varied length ("Wait, let
me compare the sizes again", "Hmm, could the green circle be larger?"). Like a
reasoning model, it reflects more on the close calls, and each doubt it voices may
talk it out of the right answer (and a later one back into it), so its long chains are
less often right than its short ones. Nothing of this looks at any training result:
it is a fixed model of a teacher (``docs/ablation.md`` has the numbers and the why).
The bridge's answer filter then keeps the chains whose final answer is right, as the
paper's rule-based filtering does; the kept long chains still hold the doubts and the
switches, which is what a student imitates.

Everything is a pure function of the scene (the teacher's randomness is seeded by a
hash of it), so the bridged set is the same byte for byte on every machine.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from typing import Any

COLOR_CHOICES = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
LETTERS = "ABCD"
MAX_ROUNDS = 5  # reflection rounds the teacher writes at most


# The teacher's reflection, in a few wordings each (a reasoning model does not repeat
# one sentence verbatim, and the bridge's repetition filter would drop a chain that did).
# {cur}/{cs}: the colour and shape it now believes larger, {o}/{os}: the other one.
PHRASES = {
    "compare": (
        "Wait, let me compare the sizes again: the {cur} {cs} is bigger than the {o} {os}.",
        "Let me double-check: the {o} {os} is the smaller one.",
    ),
    "color": (
        "Let me check the color of the larger one: it is {cur}.",
        "Wait, what color is the big shape? It is {cur}.",
    ),
    "doubt": (
        "Hmm, could the {o} {os} be larger? No, the {cur} {cs} is larger.",
        "Wait, is the {o} {os} bigger? No, it is smaller.",
    ),
}
SWITCH = (  # a doubt that talks the teacher round
    "Wait, actually the {o} {os} looks larger.",
    "Hmm, looking again, the {o} {os} is the bigger one.",
)
RATIO = (0.05, 0.45)  # area of the small shape / area of the large one
AREA = {"square": 1.0, "circle": 0.7854, "triangle": 0.5}  # of the bounding square


def make_largest(rng: random.Random, size: int):
    """(question, answer letter, scene, image) of one ``largest`` problem.

    The ratio is of the shapes' true areas (a triangle fills half its box), and the two
    never overlap, so the larger shape also has more pixels of its colour.
    """
    from .synthetic import _canvas, _shape

    big_color, small_color = rng.sample(COLOR_CHOICES, 2)
    big_shape, small_shape = rng.choice(SHAPES), rng.choice(SHAPES)
    big = rng.randint(int(size * 0.42), int(size * 0.55))
    ratio = rng.uniform(*RATIO)
    small = round((ratio * AREA[big_shape] / AREA[small_shape]) ** 0.5 * big)
    small = max(4, min(small, size - big - 1))  # side by side, both fit
    img, draw = _canvas(size)
    # Side by side along one axis (in either order), anywhere along the other.
    lead = rng.randint(0, size - big - small)
    gap = rng.randint(lead + big, size - small) if rng.random() < 0.5 else None
    if gap is None:  # small one first
        s0 = rng.randint(0, size - big - small)
        b0 = rng.randint(s0 + small, size - big)
    else:
        b0, s0 = lead, gap
    b1, s1 = rng.randint(0, size - big), rng.randint(0, size - small)
    if rng.random() < 0.5:
        (bx, by), (sx, sy) = (b0, b1), (s0, s1)
    else:
        (bx, by), (sx, sy) = (b1, b0), (s1, s0)
    _shape(draw, big_shape, (bx, by, bx + big - 1, by + big - 1), big_color)
    _shape(draw, small_shape, (sx, sy, sx + small - 1, sy + small - 1), small_color)
    true_ratio = AREA[small_shape] * small * small / (AREA[big_shape] * big * big)
    choices = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(COLOR_CHOICES))
    question = (f"Which color is the largest shape?\nChoices: {choices}\n"
                "Answer with the option's letter.")
    scene = {
        "task": "largest", "choices": COLOR_CHOICES,
        "large": {"color": big_color, "shape": big_shape, "side": big},
        "small": {"color": small_color, "shape": small_shape, "side": small},
        "ratio": round(true_ratio, 3),
    }
    return question, LETTERS[COLOR_CHOICES.index(big_color)], scene, img


def describe_largest(scene: dict[str, Any]) -> str:
    big, small = scene["large"], scene["small"]
    return (f"The image shows two shapes on a white background: a large {big['color']} "
            f"{big['shape']} about {big['side']} pixels wide and a smaller {small['color']} "
            f"{small['shape']} about {small['side']} pixels wide.")


def _teacher_rng(scene: dict[str, Any]) -> random.Random:
    return random.Random(zlib.crc32(json.dumps(scene, sort_keys=True).encode()))


def reflection_plan(scene: dict[str, Any]) -> tuple[int, float]:
    """(reflection rounds, chance that a voiced doubt switches the belief) for a scene.

    The closer the call (area ratio towards 1), the more the teacher reflects and the
    likelier a doubt talks it round, as a reasoning model does on a harder problem.
    """
    return _plan(scene, _teacher_rng(scene))


def _plan(scene: dict[str, Any], rng: random.Random) -> tuple[int, float]:
    lo, hi = RATIO
    closeness = min(1.0, max(0.0, (scene["ratio"] - lo) / (hi - lo)))  # 0 easy .. 1 close call
    rounds = sum(rng.random() < 0.25 + 0.5 * closeness for _ in range(MAX_ROUNDS))
    return rounds, 0.2 + 0.3 * closeness


def reason_largest(scene: dict[str, Any]) -> tuple[str, str]:
    """(reasoning with self-reflection, the teacher's final answer), which may be wrong."""
    rng = _teacher_rng(scene)
    rounds, switch = _plan(scene, rng)
    shapes = {scene["large"]["color"]: scene["large"]["shape"], scene["small"]["color"]: scene["small"]["shape"]}
    colors = [scene["large"]["color"], scene["small"]["color"]]
    first = rng.sample(colors, 2)
    cur = colors[0]

    def other(c: str) -> str:
        return colors[1] if c == colors[0] else colors[0]

    parts = [f"I see a {first[0]} {shapes[first[0]]} and a {first[1]} {shapes[first[1]]}. "
             f"The {cur} {shapes[cur]} is larger."]
    for _ in range(rounds):
        kind = rng.choice(("compare", "color", "doubt", "doubt"))
        o = other(cur)
        fill = {"cur": cur, "o": o, "cs": shapes[cur], "os": shapes[o]}
        if kind == "doubt" and rng.random() < switch:
            parts.append(rng.choice(SWITCH).format(**fill))
            cur = o
        else:
            parts.append(rng.choice(PHRASES[kind]).format(**fill))
    letter = LETTERS[COLOR_CHOICES.index(cur)]
    parts.append(f"So the answer is {cur}, ({letter}).")
    return " ".join(parts), letter


# The first colour a completion calls larger: the teacher's (and a cold-started model's)
# opening claim "The red circle is larger.", or the pretrained base model's direct
# answer "The largest shape is the red circle".
_CLAIM = re.compile(r"(?:The ({c}) (?:{s}) is larger|largest shape is the ({c}))".format(
    c="|".join(COLOR_CHOICES), s="|".join(SHAPES)))


def first_claim(text: str) -> str | None:
    """The colour a completion first calls the larger shape's, or None if it never does.

    What the model *saw*, before any reflection talks it round: its perception.
    """
    match = _CLAIM.search(text or "")
    return None if match is None else (match.group(1) or match.group(2))
