"""Rule-based scoring of one completion, and a unit's records summed up into its scores.

Correctness by rules, per item:

* multiple choice: the extracted option letter (``extract.extract_answer`` with the
  item's options, or a bare letter when the options could not be read) equals the
  ground truth's letter;
* a float with a ``precision`` (MathVista): both sides rounded to that many decimals are
  equal, as MathVista's own scorer does;
* a float with a ``tolerance`` (DynaMath): within it (``π`` read as pi), as DynaMath's
  scorer does;
* an integer (MathVista): the same number;
* everything else, and any of the above whose answer is not a plain number: the GRPO
  reward's ``answers_match`` (letters, words, then math-verify in bounded-time worker
  processes: ``\\frac{1}{2}`` = ``0.5``, units and degrees dropped).

A unit's summary (``summarize``) counts every item: a prompt too long to run, a
completion without an answer and a verifier timeout all count as wrong. The optional
judge's verdicts are summed beside the rule-based ones, never instead of them.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from ..answers import all_boxed_contents, normalize_answer
from ..grpo.reward import answer_block, answers_match, check_format
from .benchmarks import EvalItem
from .extract import answer_text, closest_option, dynamath_letter, extract_answer, named_letter, parse_number

__all__ = ["Verdict", "is_correct", "score", "summarize"]

# "2π", "2\pi", "π": DynaMath writes some float answers as multiples of pi.
_PI = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))?\s*(?:π|\\pi)")
_DIGITS = 4  # rounding of the reported rates


@dataclass(frozen=True)
class Verdict:
    """The rule-based verdict on one completion.

    ``extracted``: the option letter (multiple choice) or the answer text, None when the
    completion holds none; ``timed_out``: math-verify ran out of time (counted wrong);
    ``format_ok``: the strict ``<think>..</think><answer>..</answer>`` format (HFRRF's).
    """

    extracted: str | None
    correct: bool
    timed_out: bool
    format_ok: bool


def score(item: EvalItem, completion: str | None) -> Verdict:
    """The verdict on ``completion`` (None: no completion, e.g. the prompt was too long)."""
    if completion is None:
        return Verdict(None, False, False, False)
    if item.multiple_choice:
        extracted = choice(item, completion)
        return Verdict(extracted, extracted is not None and extracted == item.answer, False, check_format(completion))
    if item.answer_parts is not None:  # MM-Math: every boxed part
        predicted = predicted_parts(completion)
        correct, timed_out = parts_match(item.answer_parts, predicted, item.tolerance or 0.0)
        return Verdict(", ".join(predicted) if predicted else None, correct, timed_out, check_format(completion))
    extracted = extract_answer(completion)
    correct, timed_out = is_correct(item, extracted)
    return Verdict(extracted, correct, timed_out, check_format(completion))


def choice(item: EvalItem, completion: str) -> str | None:
    """The option letter a completion chooses, with the benchmark's own fallbacks."""
    text = answer_text(completion)
    if text is None:
        return None
    if not item.choices:  # the options are inside the image (MathVerse Vision Only)
        return named_letter(text)
    letter = extract_answer(completion, item.choices)
    if letter is None and item.choice_rule == "mathvista":
        letter = closest_option(text, item.choices)
    elif letter is None and item.choice_rule == "dynamath":
        letter = dynamath_letter(text, len(item.choices))
    return letter


def _float(text: str) -> float | None:
    text = normalize_answer(text)
    match = _PI.fullmatch(text.strip())
    if match is not None:
        return float(match.group(1) or 1.0) * math.pi
    return parse_number(text)


def is_correct(item: EvalItem, extracted: str | None) -> tuple[bool, bool]:
    """``(correct, timed_out)`` of a free-form answer against ``item.answer``."""
    if extracted is None:
        return False, False
    truth = item.answer
    if item.answer_type in ("float", "integer"):
        value, target = _float(extracted), _float(truth)
        if value is not None and target is not None:
            if item.tolerance is not None:
                return abs(value - target) <= item.tolerance + 1e-12, False
            if item.answer_type == "float" and item.precision is not None:
                return round(value, item.precision) == round(target, item.precision), False
            if item.answer_type == "integer" and item.choice_rule == "mathvista":
                # MathVista's scorer: str(int(float(extraction))) == answer (truncation)
                return math.isfinite(value) and int(value) == target, False
            return value == target, False
    if item.choice_rule == "dynamath" and item.answer_type == "text":
        # DynaMath's text rule: the answer (any case) is part of the ground truth
        folded = normalize_answer(extracted).casefold()
        if folded and folded in truth.casefold():
            return True, False
    return answers_match(extracted, truth)


# --- MM-Math: every boxed part ---------------------------------------------------------------

# MM-Math's judge drops these before comparing (units of length, degree marks, delimiters).
_MMMATH_DROP = ("\\left", "\\right", "^\\circ", "^{\\circ}", "°", "$", "\\,", "\\text{cm}^2", "\\text{cm}",
                "\\text{ cm}", "cm^{2}", "cm", "厘米")
_MMMATH_REPLACE = {"，": ",", "（": "(", "）": ")", "＋": "+", "\\infty": "oo"}
_CJK = re.compile(r"[\u4e00-\u9fff]+")


def predicted_parts(completion: str) -> list[str]:
    """The parts a completion answers: the boxes of its ``<answer>`` block, else every box
    of the completion (MM-Math's judge reads all of them), else its extracted answer."""
    block = answer_block(completion)
    boxes = all_boxed_contents(block) if block is not None else []
    if not boxes:
        boxes = all_boxed_contents(completion)
    if not boxes:
        text = answer_text(completion)
        boxes = [text] if text else []
    return [p for p in (_mmmath_clean(b) for b in _split_parts(boxes)) if p]


def _split_parts(boxes: list[str]) -> list[str]:
    """Boxes joined and split at commas outside brackets, ``\\pm`` as two parts (MM-Math)."""
    parts: list[str] = []
    for box in boxes:
        depth, start = 0, 0
        for i, char in enumerate(box):
            if char in "([{":
                depth += 1
            elif char in ")]}":
                depth -= 1
            elif char in ",，" and depth == 0:
                parts.append(box[start:i])
                start = i + 1
        parts.append(box[start:])
    out = []
    for part in parts:
        if "\\pm" in part:
            out += [part.replace("\\pm", "+"), part.replace("\\pm", "-")]
        else:
            out.append(part)
    return out


def _mmmath_clean(text: str) -> str:
    for old, new in _MMMATH_REPLACE.items():
        text = text.replace(old, new)
    for drop in _MMMATH_DROP:
        text = text.replace(drop, "")
    if not _CJK.fullmatch(text.strip()):
        text = _CJK.sub("", text)
    return normalize_answer(text.strip().strip(",.:;=`，。"))


def _part_equal(truth: str, predicted: str, tolerance: float) -> tuple[bool, bool]:
    if truth == predicted:
        return True, False
    value, target = _float(predicted), _float(truth)
    if value is not None and target is not None:
        # the judge also accepts a percentage written as a fraction and the reverse
        return any(abs(t - value) <= tolerance * 1.01 for t in (target, target / 100, target * 100)), False
    return answers_match(predicted, truth)


def parts_match(truth: list[str], predicted: list[str], tolerance: float) -> tuple[bool, bool]:
    """``(correct, timed_out)``: as many parts as the ground truth, each matched by one
    predicted part in any order (numbers within ``tolerance``, else math-verify)."""
    wanted = [p for p in (_mmmath_clean(b) for b in _split_parts(truth)) if p]
    if not wanted or len(wanted) != len(predicted):
        return False, False
    left, timed_out = list(predicted), False
    for part in wanted:
        for i, candidate in enumerate(left):
            equal, slow = _part_equal(part, candidate, tolerance)
            timed_out = timed_out or slow
            if equal:
                del left[i]
                break
        else:
            return False, timed_out
    return True, False


# --- a unit's summary ------------------------------------------------------------------------


def _rate(count: float, total: int) -> float | None:
    return round(count / total, _DIGITS) if total else None


def _scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and count (and judged accuracy, when a judge ran) of some records."""
    out: dict[str, Any] = {"accuracy": _rate(sum(r["correct"] for r in records), len(records)),
                           "n": len(records)}
    judged = [r["judged"] for r in records if r.get("judged") is not None]
    if judged:
        out["judgedAccuracy"] = _rate(sum(judged), len(judged))
    return out


def _category_scores(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"<group>:<value>": scores}``: MathVista's ``task:GPS``, ``skill:ALG``..."""
    members: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        for group, values in (record.get("categories") or {}).items():
            for value in values:
                members[f"{group}:{value}"].append(record)
    out = {}
    for name in sorted(members):
        out[name] = _scores(members[name])
        worst, groups = _worst_case(members[name])
        if groups:  # DynaMath reports its worst case per subject and level too
            out[name]["worstCaseAccuracy"] = worst
    return out


def _worst_case(records: Iterable[dict[str, Any]]) -> tuple[float | None, int]:
    """DynaMath's worst-case accuracy: a question counts only if all its variants are right."""
    groups: dict[str, bool] = {}
    for record in records:
        if record.get("group") is not None:
            groups[record["group"]] = groups.get(record["group"], True) and record["correct"]
    return _rate(sum(groups.values()), len(groups)), len(groups)


def summarize(records: list[dict[str, Any]], judge_ran: bool = False) -> dict[str, Any]:
    """A unit's scores from its per-sample records (the fields ``evaluate_unit`` writes).

    Rates divide by all records; ``judgedAccuracy`` divides by the records the judge gave
    a verdict on (``judgeFailures`` counts the others); ``reasoningLengthMean`` is the
    mean completion length in tokens of the final attempts that ran.
    """
    n = len(records)
    ran = [r for r in records if r.get("error") is None]
    out = _scores(records)
    out.update({
        "correct": sum(r["correct"] for r in records),
        "formatFailureRate": _rate(sum(not r["format_ok"] for r in records), n),
        "unansweredRate": _rate(sum(r["extracted"] is None for r in records), n),
        "reasoningLengthMean": round(sum(r["tokens"] for r in ran) / len(ran), 1) if ran else None,
        "truncatedRate": _rate(sum(bool(r.get("truncated")) for r in records), n),
        "retries": sum(r["attempts"] - 1 for r in records if r["attempts"] > 0),
        "retriedSamples": sum(r["attempts"] > 1 for r in records),
        "promptsTooLong": sum(r.get("error") == "prompt_too_long" for r in records),
        "verifierTimeouts": sum(bool(r.get("timed_out")) for r in records),
    })
    if judge_ran:
        out["judgeFailures"] = sum(r.get("judged") is None for r in records)
    worst, groups = _worst_case(records)
    if groups:
        out["worstCaseAccuracy"], out["questions"] = worst, groups
    out["categories"] = _category_scores(records)
    return out
