"""Bridge filters, parsing, statistics and prompts on crafted texts."""

from __future__ import annotations

import pytest

from visionr1_trainer.bridge import prompts
from visionr1_trainer.bridge.filters import (
    Parsed,
    build_sample,
    filter_reason,
    parse_reasoning,
    repetition_ratio,
)
from visionr1_trainer.bridge.stats import dataset_stats, distribution, reflection_counts
from visionr1_trainer.config import BridgeFilters, BridgePrompts

FILTERS = BridgeFilters()


@pytest.mark.parametrize("text, channel, expected", [
    ("<think>\nCount: 3.\n</think>\n\nSo there are \\boxed{3} shapes.", None, Parsed("Count: 3.", "3")),
    # R1's template opens <think> itself: only the closing tag is generated.
    ("Two and two.\n</think>\nFinal Answer: 4", None, Parsed("Two and two.", "4")),
    ("The answer is C.", "Hmm, blue is option C.", Parsed("Hmm, blue is option C.", None)),
    ("**Final Answer:** (C)", "Hmm, blue is option C.", Parsed("Hmm, blue is option C.", "(C)")),
    ("I think it is 5.\nFinal Answer: 5\n", None, Parsed("I think it is 5.", "5")),
    ("<think>r</think><answer> Final Answer:\\frac{1}{2} </answer>", None, Parsed("r", "\\frac{1}{2}")),
    ("<think>no answer given</think> I am not sure.", None, Parsed("no answer given", None)),
])
def test_parse_reasoning(text, channel, expected):
    assert parse_reasoning(text, channel) == expected


def test_build_sample_is_the_vision_r1_format():
    assert build_sample(Parsed("because", "7")) == "<think>because</think><answer> Final Answer:7 </answer>"


@pytest.mark.parametrize("parsed, truth, filters, reason", [
    (Parsed("Wait, 3 + 4 = 7.", "7"), "7", FILTERS, None),
    (Parsed("Wait, 3 + 4 = 7.", "7.0"), "7", FILTERS, None),          # math-verify equality
    (Parsed("Blue is option C.", "(C)"), "C", FILTERS, None),           # choice letters
    (Parsed("Wait, 3 + 4 = 8.", "8"), "7", FILTERS, "answer_mismatch"),
    (Parsed("Wait, 3 + 4 = 8.", "8"), "7", BridgeFilters(answerMatch=False), None),
    (Parsed("no answer", None), "7", FILTERS, "no_final_answer"),
    (Parsed("", "7"), "7", FILTERS, "bad_format"),
    (Parsed("sneaky </think> tag", "7"), "7", FILTERS, "bad_format"),
    (Parsed("sneaky </think> tag", "7"), "7", BridgeFilters(format=False), None),
    (Parsed("short", "7"), "7", BridgeFilters(minReasoningChars=10), "too_short"),
    (Parsed("x" * 50, "7"), "7", BridgeFilters(maxReasoningChars=49), "too_long"),
    (Parsed("I add. " + "Let me add again. " * 20, "7"), "7", FILTERS, "repetitive"),
])
def test_filter_reason(parsed, truth, filters, reason):
    assert filter_reason(parsed, truth, filters) == reason


def test_repetition_ratio():
    assert repetition_ratio("One. Two. Three.") == 0.0
    assert repetition_ratio("") == 0.0
    loop = "Start here.\n" + "Same line again.\n" * 9
    assert repetition_ratio(loop) == pytest.approx(9 * 16 / (11 + 9 * 16))


def test_reflection_markers_and_stats():
    counts = reflection_counts("Wait, wait. Hmm... Let me check. Let me double-check it. Alternatively, await.")
    assert counts["wait"] == 2 and counts["hmm"] == 1 and counts["alternatively"] == 1
    assert counts["let me check"] == 2 and counts["double-check"] == 1
    kept = [{"reasoning_chars": 10, "reasoning_words": 2, "reflection": {"wait": 2},
             "response": "<think>Wait, 3. Wait.</think><answer> Final Answer:3 </answer>"},
            {"reasoning_chars": 30, "reasoning_words": 6, "reflection": {"wait": 0},
             "response": "<think>So 4.</think><answer> Final Answer:4 </answer>"}]
    stats = dataset_stats(kept, 4, {"answer_mismatch": 2}, {}, {"m": {"backend": "rule"}}, {})
    assert stats["teacher"] == "rule-based (synthetic tasks only)"
    assert stats["self_reflection"]["wait_total"] == 2
    assert stats["self_reflection"]["per_sample_mean"] == 1.0
    assert stats["self_reflection"]["samples_with_any"] == 1
    assert stats["keep_rate"] == 0.5 and stats["dropped"] == {"answer_mismatch": 2}
    assert distribution([1, 2, 3, 4])["histogram"]["counts"] == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert dataset_stats([], 0, {}, {}, {"m": {"backend": "openai"}}, {})["teacher"] == "models"


def test_wait_count_is_the_papers_per_sample_and_in_total():
    """The paper's self-reflection figure: the word "Wait" in the kept samples' texts
    (not "await", "waiting" or "wait" in prose), per sample and in total (issue 15, item 4)."""
    from visionr1_trainer.bridge.stats import wait_count

    assert wait_count("Wait, no. Hmm. Wait... we await; waiting. wait") == 2
    kept = [{"reasoning_chars": 1, "reasoning_words": 1, "reflection": {}, "response": f"<think>{t}</think>"}
            for t in ("Wait. Wait. Wait.", "Wait, 2.", "No reflection.", "Wait")]
    reflection = dataset_stats(kept, 4, {}, {}, {"m": {"backend": "openai"}}, {})["self_reflection"]
    assert (reflection["wait_total"], reflection["wait_per_sample"]) == (5, 1.25)
    assert reflection["wait_distribution"]["max"] == 3.0


def test_prompts_default_override_and_literal_substitution():
    defaults = prompts.templates(BridgePrompts())
    assert defaults == prompts.DEFAULTS
    custom = prompts.templates(BridgePrompts(reasoning="Given {description}, solve {question} in $\\{x\\}$."))
    text = prompts.render(custom["reasoning"], description="a {b}", question="q")
    assert text == "Given a {b}, solve q in $\\{x\\}$."
    with pytest.raises(ValueError, match=r"bridge.prompts.pseudoCot: .*\{answer\}"):
        prompts.templates(BridgePrompts(pseudoCot="Explain {question}."))
