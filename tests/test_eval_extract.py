"""Answer extraction for the eval stage: crafted completions with exact expected answers."""

from __future__ import annotations

import time

import pytest

from visionr1_trainer.eval.extract import extract_answer, parse_inline_choices, parse_number

FREE_FORM = [
    # the project's format: <answer> Final Answer:X </answer>
    ("<think>2+3</think><answer> Final Answer:5 </answer>", "5"),
    ("<think>x</think><answer>Final Answer: $\\frac{1}{2}$</answer>", "\\frac{1}{2}"),
    ("<think>x</think><answer> final answer: 12 cm </answer>", "12 cm"),
    ("<think>x</think><answer>Final Answer: \\boxed{3\\sqrt{2}}</answer>", "3\\sqrt{2}"),
    ("<think>x</think><answer>Final Answer: 4. Final Answer: 7</answer>", "7"),
    ("<answer>I computed it. Final Answer: -3.5.</answer>", "-3.5"),
    ("<think>a</think><answer> Final Answer:  \\text{red} </answer>", "red"),
    ("<think>a</think>\n<answer>\nFinal Answer: 30^\\circ\n</answer>", "30^\\circ"),
    # the <answer> block without "Final Answer:": its last box, else its content
    ("<think>x</think><answer>so \\boxed{1} or rather \\boxed{2}</answer>", "2"),
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<think>x</think><answer>$x^2+1$</answer>", "x^2+1"),
    # the last <answer> block counts
    ("<answer>Final Answer: 1</answer> wait <answer>Final Answer: 2</answer>", "2"),
    # an empty block falls through to the next source
    ("<think>\\boxed{9}</think><answer>  </answer>", "9"),
    # \boxed{} anywhere: the last complete one, nested braces kept
    ("The result is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("First \\boxed{1}, then \\boxed{10}.", "10"),
    ("\\boxed {8}", "8"),
    ("$\\boxed{\\sqrt{3}}$", "\\sqrt{3}"),
    ("the answer \\boxed{5} and an unclosed \\boxed{6", "5"),
    # a box beats a last line
    ("\\boxed{4}\nThe answer is 5", "4"),
    # the last line: "Answer: X" / "The answer is X"
    ("Let me think.\nAnswer: 17", "17"),
    ("Some steps\nThe answer is 2.5.", "2.5"),
    ("Reasoning...\nSo the final answer is $\\pi/2$", "\\pi/2"),
    ("Steps\n**Answer:** 64", "64"),
    ("Steps\nThe answer is: yes", "yes"),
    ("Steps\nFinal Answer: 3", "3"),
    ("<answer> Final Answer: 8", "8"),  # truncated before </answer>: the last line still says it
    # no answer at all
    ("I am not sure what the figure shows.", None),
    ("The answer is in the figure.\nI cannot tell.", None),
    ("", None),
    ("<think>still thinking about it", None),
    ("<answer></answer>", None),
]

MULTIPLE_CHOICE = [
    # (completion, choices, expected letter)
    ("<answer> Final Answer:B </answer>", ["145°", "165°", "155°", "175°"], "B"),
    ("<answer> Final Answer: (c) </answer>", ["145°", "165°", "155°", "175°"], "C"),
    ("<answer>Final Answer: D.</answer>", ["1", "2", "3", "4"], "D"),
    ("<answer>Final Answer: \\text{(A)}</answer>", ["1", "2"], "A"),
    ("<answer>Final Answer: 165°</answer>", ["145°", "165°", "155°", "175°"], "B"),
    ("<answer>Final Answer: 165</answer>", ["145°", "165°", "155°", "175°"], "B"),
    ("<answer>Final Answer: (B) 165°</answer>", ["145°", "165°", "155°", "175°"], "B"),
    ("<answer>Final Answer: C: 155°</answer>", ["145°", "165°", "155°", "175°"], "C"),
    ("<answer>Final Answer: b 165°</answer>", ["145°", "165°", "155°", "175°"], "B"),
    ("<answer>Final Answer: Blue</answer>", ["red", "green", "blue", "yellow"], "C"),
    ("<answer>Final Answer:   GREEN  </answer>", ["red", "green", "blue", "yellow"], "B"),
    ("The answer is option D", ["red", "green", "blue", "yellow"], "D"),
    ("\\boxed{A}", ["yes", "no"], "A"),
    ("Answer: no", ["yes", "no"], "B"),
    ("<answer>Final Answer: F</answer>", ["1", "2", "3", "4"], None),  # no option F
    ("<answer>Final Answer: 150°</answer>", ["145°", "165°", "155°", "175°"], None),  # not an option
    ("<answer>Final Answer: purple</answer>", ["red", "green", "blue", "yellow"], None),
    ("<answer>Final Answer: 2</answer>", ["2", "2.0", "3"], "A"),  # the exact text wins
    ("<answer>Final Answer: 2.00</answer>", ["2", "2.0", "3"], None),  # two options have that value
    ("no answer here", ["red", "green"], None),
    ("<answer>Final Answer: G</answer>", [f"o{i}" for i in range(8)], "G"),  # MathVista has up to 8
]


@pytest.mark.parametrize("completion, expected", FREE_FORM)
def test_free_form(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, choices, expected", MULTIPLE_CHOICE)
def test_multiple_choice(completion, choices, expected):
    assert extract_answer(completion, choices) == expected


def test_at_least_forty_crafted_completions():
    assert len(FREE_FORM) + len(MULTIPLE_CHOICE) >= 40


@pytest.mark.parametrize("bad", [None, 12, b"<answer>1</answer>", ["<answer>1</answer>"], object()])
def test_never_raises_on_non_text(bad):
    assert extract_answer(bad) is None
    assert extract_answer(bad, ["a", "b"]) is None


def test_odd_choices_do_not_raise():
    assert extract_answer("<answer>Final Answer: A</answer>", []) is None
    assert extract_answer("<answer>Final Answer: 3</answer>", [None, 3, "x"]) == "B"


def test_linear_time_on_hostile_completions():
    hostile = [
        "\\boxed{" * 20000 + "1",
        "answer " * 50000 + "is",
        "<answer>" * 20000 + "Final Answer:" * 20000,
        "(A) " * 50000,
        "$" * 100000,
        "\n" * 100000 + "The answer is " + "9" * 50000,
    ]
    started = time.perf_counter()
    for text in hostile:
        extract_answer(text)
        extract_answer(text, ["1", "2", "3"])
    assert time.perf_counter() - started < 5.0


def test_parse_inline_choices():
    inline = "What color?\nChoices: (A) red (B) green (C) blue (D) yellow\nAnswer with the letter."
    assert parse_inline_choices(inline) == ["red", "green", "blue", "yellow"]
    assert parse_inline_choices("angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°") \
        == ["40°", "60°", "120°", "140°"]
    assert parse_inline_choices("Hint: give the letter.\nQuestion: x?\nChoices:\n(A) 1\n(B) 2") == ["1", "2"]
    assert parse_inline_choices("A. first\nB. second\nC. third") == ["first", "second", "third"]
    assert parse_inline_choices("How many shapes are there?") is None
    assert parse_inline_choices("Choices: (A) only one") is None
    assert parse_inline_choices("Choices: (B) 1 (C) 2") is None  # must start at A


def test_parse_number():
    assert parse_number("145°") == 145.0
    assert parse_number("1,200") == 1200.0
    assert parse_number("12 cm") == 12.0
    assert parse_number("30^\\circ") == 30.0
    assert parse_number("-.5") == -0.5
    assert parse_number("3x+1") is None
    assert parse_number("twelve") is None
