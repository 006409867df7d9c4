"""From the reasoning model's output to a cold-start sample, and the rule-based filters.

A DeepSeek-R1-class answer is ``<think>{reasoning}</think>{summary with the final
answer}`` (R1's chat template often opens the ``<think>`` itself, so only ``</think>``
appears), or the reasoning arrives apart (``reasoning_content``). ``parse_reasoning``
splits that into the reasoning and the final answer; ``build_sample`` writes the target
``<think>{reasoning}</think><answer> Final Answer:{answer} </answer>``; ``filter_reason``
applies the filters in a fixed order and names the first one a sample fails.

The format check and the answer comparison are the GRPO reward's own (``grpo.reward``:
``check_format``, ``answers_match`` with math-verify in bounded worker processes), so a
kept sample is one the Hard Format Result Reward would score 1.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

from ..answers import after_final_answer, extract_final_answer, last_boxed_content
from ..data.formats import format_response

# Drop reasons, in the order the filters run (the statistics use these names).
DROP_REASONS = (
    "duplicate", "generation_failed", "truncated", "no_final_answer", "bad_format", "answer_mismatch",
    "answer_check_timeout", "too_short", "too_long", "repetitive",
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Parsed:
    reasoning: str
    answer: str | None  # None: the output states no final answer


def parse_reasoning(text: str, reasoning_channel: str | None = None) -> Parsed:
    """Split a reasoning model's output into its reasoning and its final answer.

    The answer is taken from the part after the reasoning: its ``<answer>`` block, last
    ``Final Answer:`` or last ``\\boxed{}`` (``answers.extract_final_answer``); without
    any of those there is no final answer. A boxed answer is read whole, however many
    lines it spans (a matrix, a piecewise function), its line breaks turned into spaces;
    an unboxed one ends at its first line, where the model's closing remarks begin.
    """
    if reasoning_channel:
        reasoning, rest = reasoning_channel, text
    elif "</think>" in text:
        head, _, rest = text.rpartition("</think>")
        reasoning = head.split("<think>", 1)[-1]
    else:  # no think block: the reasoning runs up to the final-answer statement
        reasoning, rest = text, text
        at = text.lower().rfind("final answer:")
        if at >= 0:
            reasoning = text[:at]
    answer_open, answer_close = rest.rfind("<answer>"), rest.rfind("</answer>")
    if 0 <= answer_open < answer_close:
        rest = rest[answer_open + len("<answer>"):answer_close]
    elif after_final_answer(rest) is None and last_boxed_content(rest) is None:
        return Parsed(reasoning.strip(), None)
    answer = extract_final_answer(rest).strip().lstrip("*:").strip() if rest.strip() else ""
    tail = after_final_answer(rest)
    if last_boxed_content(rest if tail is None else tail) is not None:
        answer = " ".join(answer.split())
    else:
        answer = answer.splitlines()[0].strip() if answer else ""
    return Parsed(reasoning.strip(), answer or None)


def build_sample(parsed: Parsed) -> str:
    """The cold-start target text."""
    return format_response(parsed.reasoning, parsed.answer or "")


def repetition_ratio(reasoning: str) -> float:
    """Share of the reasoning's characters taken by its most repeated line or sentence.

    Only a sentence that occurs at least twice counts; 0.0 when nothing repeats. A model
    stuck in a loop writes the same sentence over and over: the ratio goes towards 1.
    """
    units = [u.strip() for u in _SENTENCE.split(reasoning) if u.strip()]
    if not units:
        return 0.0
    counts = collections.Counter(units)
    unit, times = max(counts.items(), key=lambda kv: (kv[1] * len(kv[0]), kv[0]))
    if times < 2:
        return 0.0
    total = sum(len(u) for u in units)
    return times * len(unit) / total


def filter_reason(parsed: Parsed, ground_truth: str, filters) -> str | None:
    """The first filter (``BridgeFilters``) the sample fails, or None to keep it."""
    from ..grpo.reward import answers_match, check_format

    if parsed.answer is None:
        return "no_final_answer"
    response = build_sample(parsed)
    if filters.format and (not parsed.reasoning or not check_format(response)):
        return "bad_format"
    if filters.answer_match:
        equal, timed_out = answers_match(parsed.answer, ground_truth)
        if timed_out:
            return "answer_check_timeout"
        if not equal:
            return "answer_mismatch"
    if len(parsed.reasoning) < filters.min_reasoning_chars:
        return "too_short"
    if len(parsed.reasoning) > filters.max_reasoning_chars:
        return "too_long"
    if repetition_ratio(parsed.reasoning) > filters.max_repetition:
        return "repetitive"
    return None
