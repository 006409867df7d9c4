"""The Hard Format Result Reward Function (HFRRF, Vision-R1 arXiv 2503.06749) and its helpers.

What counts, decided here and in the module docstring of ``visionr1_trainer.grpo.reward``:
an empty ``<think></think>`` still has the format; units and degrees are dropped
(``5 cm`` = 5, ``30^\\circ`` = 30); ``50\\%`` equals both 50 and 0.5 (math-verify's rule);
a choice-letter ground truth is compared as a letter only; a word ground truth as text;
answers longer than ``MAX_ANSWER_CHARS`` or with power towers are refused (0.0).
Every call must return within ``BOUND_S`` (a bound, not a benchmark).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from visionr1_trainer.answers import (
    after_final_answer,
    choice_letter,
    extract_final_answer,
    last_boxed_content,
    normalize_answer,
)
from visionr1_trainer.grpo import reward
from visionr1_trainer.grpo.reward import (
    RewardResult,
    batch_rewards,
    hard_format_result_reward,
    score_completion,
)

BOUND_S = 5.0
MEGABYTE = 1_000_000


def C(answer: str, think: str = "The triangle is isosceles, so ...") -> str:
    """A completion with the right format."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def timed(fn, *args):
    started = time.monotonic()
    result = fn(*args)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, f"took {elapsed:.2f} s"
    return result


# (id, completion, ground truth, expected reward)
CASES = [
    # --- format x answer
    ("format-ok-answer-ok", C("Final Answer: 12"), "12", 1.0),
    ("format-ok-answer-wrong", C("Final Answer: 13"), "12", 0.0),
    ("text-before-think-answer-ok", "Sure! " + C("12"), "12", 0.0),
    ("text-before-think-answer-wrong", "Sure! " + C("13"), "12", 0.0),
    ("outer-whitespace-ok", "\n  " + C("12") + "\n\n", "12", 1.0),
    ("whitespace-between-blocks-ok", "<think>a</think>\n \n<answer>12</answer>", "12", 1.0),
    ("multiline-blocks", "<think>\nstep 1\nstep 2\n</think>\n<answer>\nFinal Answer: 12\n</answer>\n", "12", 1.0),
    ("text-between-blocks", "<think>a</think> so <answer>12</answer>", "12", 0.0),
    ("text-after-answer", C("12") + " Done.", "12", 0.0),
    ("empty-think-is-format", "<think></think><answer>12</answer>", "12", 1.0),
    ("two-think-blocks", "<think>a</think><think>b</think><answer>12</answer>", "12", 0.0),
    ("two-answer-blocks", "<think>a</think><answer>12</answer><answer>12</answer>", "12", 0.0),
    ("answer-before-think", "<answer>12</answer><think>a</think>", "12", 0.0),
    ("missing-close-think", "<think>a<answer>12</answer>", "12", 0.0),
    ("missing-close-answer", "<think>a</think><answer>12", "12", 0.0),
    ("nested-think", "<think>a<think>b</think></think><answer>12</answer>", "12", 0.0),
    ("answer-tag-inside-think", C("12", think="I will put it in <answer> tags"), "12", 0.0),
    ("stray-closing-tag", C("12", think="a</answer>"), "12", 0.0),
    ("uppercase-tags", "<THINK>a</THINK><ANSWER>12</ANSWER>", "12", 0.0),
    ("no-tags", "12", "12", 0.0),
    ("empty-answer", C(""), "12", 0.0),
    ("final-answer-empty", C("Final Answer:"), "12", 0.0),
    # --- LaTeX and numbers (math-verify)
    ("frac-vs-decimal", C("\\frac{1}{2}"), "0.5", 1.0),
    ("slash-vs-frac", C("1/2"), "\\frac{1}{2}", 1.0),
    ("boxed-nested-braces", C("So \\boxed{\\frac{1}{2}}."), "0.5", 1.0),
    ("double-box", C("\\boxed{\\boxed{7}}"), "7", 1.0),
    ("sqrt-equivalent", C("3\\sqrt{2}"), "\\sqrt{18}", 1.0),
    ("sqrt-coefficient-only", C("3\\sqrt{2}"), "3", 0.0),
    ("degrees-dropped", C("30^\\circ"), "30", 1.0),
    ("units-dropped", C("5 cm"), "5", 1.0),
    ("text-units-dropped", C("5\\text{ cm}"), "5", 1.0),
    ("percent-vs-number", C("50\\%"), "50", 1.0),
    ("percent-vs-fraction", C("50\\%"), "0.5", 1.0),
    ("trailing-zero", C("2.50"), "2.5", 1.0),
    ("unicode-minus", C("\u22123"), "-3", 1.0),
    ("sign-matters", C("-3"), "3", 0.0),
    ("dollar-dfrac", C("$\\dfrac{3}{4}$"), "0.75", 1.0),
    ("too-coarse-decimal", C("1.732"), "\\sqrt{3}", 0.0),
    ("close-is-not-equal", C("59.99"), "60", 0.0),
    # --- where the answer is taken from
    ("final-answer-lowercase", C("final answer: 7"), "7", 1.0),
    ("final-answer-caps-period", C("FINAL ANSWER: 7."), "7", 1.0),
    ("final-answer-last-wins", C("Final Answer: 3. Wait. Final Answer: 7"), "7", 1.0),
    ("final-answer-earlier-loses", C("Final Answer: 3. Wait. Final Answer: 7"), "3", 0.0),
    ("final-answer-boxed", C("Final Answer: \\boxed{7}"), "7", 1.0),
    ("final-answer-markdown", C("**Final Answer:** 7"), "7", 1.0),
    ("final-answer-dollar-boxed", C("Final Answer: $\\boxed{12}$."), "12", 1.0),
    ("last-box-wins", C("Not \\boxed{4} but \\boxed{7}"), "7", 1.0),
    ("earlier-box-loses", C("Not \\boxed{4} but \\boxed{7}"), "4", 0.0),
    # --- multiple choice: letters only
    ("choice-plain", C("A"), "A", 1.0),
    ("choice-paren-lower", C("(a)"), "A", 1.0),
    ("choice-lower-period", C("Final Answer: b."), "B", 1.0),
    ("choice-gt-in-parens", C("Final Answer: B"), "(B)", 1.0),
    ("choice-text-wrapped", C("\\text{(C)}"), "C", 1.0),
    ("choice-wrong-letter", C("B"), "C", 0.0),
    ("choice-number-vs-letter", C("2"), "B", 0.0),
    ("choice-letter-vs-number", C("B"), "2", 0.0),
    ("choice-with-option-text", C("B 12"), "B", 0.0),
    # --- word answers: text, not algebra
    ("word-same", C("Final Answer: red"), "red", 1.0),
    ("word-case-period", C("Red."), "red", 1.0),
    ("word-anagram", C("der"), "red", 0.0),
    ("word-wrong", C("blue"), "red", 0.0),
    # --- hostile inputs: 0.0 and fast
    ("boxes-500-deep", C("\\boxed{" * 500 + "1" + "}" * 500), "1", 0.0),
    ("megabyte-no-tags", "x" * MEGABYTE, "1", 0.0),
    ("megabyte-think-is-fine", C("12", think="a" * MEGABYTE), "12", 1.0),
    ("megabyte-answer", C("1" * MEGABYTE), "1", 0.0),
    ("megabyte-of-tags", "<think>" * (MEGABYTE // 7), "1", 0.0),
    ("tower-10", C("\\boxed{10^{10^{10^{10}}}}"), "1", 0.0),
    ("tower-9", C("9^{9^{9^{9}}}"), "1", 0.0),
    ("python-tower", C("9**9**9**9"), "1", 0.0),
    ("huge-literal-exponent", C("2^{100000000}"), "1", 0.0),
    ("none-completion", None, "1", 0.0),
    ("none-ground-truth", C("1"), None, 0.0),
    ("int-completion", 12, "12", 0.0),
    ("bytes-completion", b"<think>a</think><answer>12</answer>", "12", 0.0),
    ("int-ground-truth", C("12"), 12, 0.0),
]


@pytest.mark.parametrize(("completion", "ground_truth", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hfrrf_table(completion, ground_truth, expected):
    assert timed(hard_format_result_reward, completion, ground_truth) == expected


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


# --- score_completion's fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "ground_truth", "expected"),
    [
        (C("Final Answer: 12 "), "12", RewardResult(1.0, True, True, "12", False)),
        (C("Final Answer: 13"), "12", RewardResult(0.0, True, False, "13", False)),
        ("Hmm " + C("\\boxed{12}"), "12", RewardResult(0.0, False, True, "12", False)),
        ("<think>a</think>12", "12", RewardResult(0.0, False, False, None, False)),
        (None, "12", RewardResult(0.0, False, False, None, False)),
        (C("\\boxed{10^{10^{10}}}"), "1", RewardResult(0.0, True, False, "10^{10^{10}}", False)),
    ],
    ids=["right", "wrong-answer", "bad-format-right-answer", "no-answer-block", "none", "refused-tower"],
)
def test_score_completion_fields(completion, ground_truth, expected):
    assert timed(score_completion, completion, ground_truth) == expected


def test_slow_comparison_times_out_and_counts_wrong():
    """A binomial sympy cannot finish: math-verify's alarm in the worker stops it."""
    result = timed(score_completion, C("\\binom{10^{9}}{5 \\cdot 10^{8}}"), "1")
    assert (result.reward, result.answer_ok, result.timed_out) == (0.0, False, True)


def test_worker_overrunning_the_deadline_is_killed_and_replaced(monkeypatch):
    """The caller's own deadline (here shorter than math-verify's 1 s alarm) kills the worker."""
    kills = []
    real_kill = reward._Worker.kill
    monkeypatch.setattr(reward._Worker, "kill", lambda self: (kills.append(self), real_kill(self)))
    monkeypatch.setattr(reward, "VERIFY_TIMEOUT_S", 0.3)
    result = timed(score_completion, C("(10^{7})!"), "1")
    assert result.timed_out and not result.answer_ok
    assert len(kills) == 1 and not kills[0].alive()
    monkeypatch.undo()
    assert timed(score_completion, C("\\frac{6}{4}"), "1.5").reward == 1.0  # a fresh worker


def test_never_raises_when_a_helper_does(monkeypatch):
    def broken(_):
        raise RuntimeError("boom")

    monkeypatch.setattr(reward, "extract_final_answer", broken)
    assert score_completion(C("12"), "12") == RewardResult(0.0, False, False, None, False)


# --- threads and batches ----------------------------------------------------------------------


def test_hostile_input_off_the_main_thread_is_bounded(monkeypatch):
    """With the pre-filter off, a power tower reaches sympy; still bounded from any thread."""
    monkeypatch.setattr(reward, "_too_costly", lambda text: False)
    results = []
    thread = threading.Thread(
        target=lambda: results.append(timed(score_completion, C("9^{9^{9^{9}}}"), "1")), name="not-main"
    )
    thread.start()
    thread.join(timeout=2 * BOUND_S)
    assert not thread.is_alive()
    assert results and results[0].timed_out and results[0].reward == 0.0


def test_batch_from_worker_threads_matches_serial():
    completions = [c[1] for c in CASES]
    truths = [c[2] for c in CASES]
    serial = [score_completion(c, t) for c, t in zip(completions, truths)]
    with ThreadPoolExecutor(max_workers=2) as outer:
        batched = list(outer.map(lambda _: batch_rewards(completions, truths, max_workers=4), range(2)))
    assert batched == [serial, serial]
    assert [r.reward for r in serial] == [c[3] for c in CASES]


def test_batch_rejects_bad_arguments():
    assert batch_rewards([], []) == []
    with pytest.raises(ValueError, match="completions has 1 items but ground_truths has 2"):
        batch_rewards(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="max_workers must be at least 1, got 0"):
        batch_rewards(["a"], ["a"], max_workers=0)


# --- answers.py helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} and \\boxed{2}", "2"),
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
        ("\\boxed {4}", "4"),
        ("\\boxed{5} then \\boxed{6", "5"),
        ("\\boxed{\\{7\\}}", "\\{7\\}"),
        ("no box", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_final_answer_helpers():
    assert after_final_answer("a Final answer: 1 FINAL ANSWER: 2") == " 2"
    assert after_final_answer("no marker") is None
    assert extract_final_answer(" Final Answer: \\boxed{x+1} ") == "x+1"
    assert extract_final_answer(" 42 ") == "42"
    assert normalize_answer(" $\\boxed{\\text{(B)}}$. ") == "(B)"
    assert normalize_answer("$1$ and $2$") == "$1$ and $2$"
    letters = [choice_letter(t) for t in ("B", "(b)", "b.", "B)", "2", "AB", "B 12")]
    assert letters == ["B", "B", "B", "B", None, None, None]
