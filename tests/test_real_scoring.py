"""Rule-based scoring as each benchmark's official scorer does it (MathVista's calculate_score.py,
MM-Math's eval.py, DynaMath's evaluation in VLMEvalKit, MathVerse's vision-only options)."""

from __future__ import annotations

from visionr1_trainer.eval import extract, scoring
from visionr1_trainer.eval.benchmarks import EvalItem
from visionr1_trainer.eval.scoring import score


def make(*args, **fields) -> EvalItem:
    """An EvalItem; fields this version does not know are dropped (so each test fails alone)."""
    known = EvalItem.__dataclass_fields__
    return EvalItem(*args, **{k: v for k, v in fields.items() if k in known})


def answer(text: str) -> str:
    return f"<think>working</think><answer> Final Answer:{text} </answer>"


def mathvista_choice() -> EvalItem:
    return make("1", "q", "B", [], choices=["145°", "165°", "155°", "175°"], multiple_choice=True,
                    answer_type="choice", choice_rule="mathvista")


def test_mathvista_multiple_choice_falls_back_as_its_scorer_does():
    item = mathvista_choice()
    assert score(item, answer("The answer is B")).correct  # the letter after "the answer is"
    assert score(item, answer("I pick (B) here")).correct  # the first "(X)"
    assert score(item, answer("165 degrees")).extracted == "B"  # closest option by edit distance
    assert score(item, answer("166°")).correct
    assert not score(item, "no answer at all, nothing to extract\n").correct
    plain = make("1", "q", "B", [], choices=item.choices, multiple_choice=True, answer_type="choice")
    assert score(plain, answer("166°")).extracted is None  # other benchmarks: never a guess


def test_closest_option_and_edit_distance():
    assert extract.edit_distance("kitten", "sitting") == 3 and extract.edit_distance("", "abc") == 3
    assert extract.closest_option("larger", ["larger than", "equal to", "smaller than"]) == "A"
    assert extract.closest_option("(c)", ["1", "2", "3"]) == "C"


def test_mathvista_integer_and_precision():
    integer = make("2", "q", "3", [], answer_type="integer", choice_rule="mathvista")
    assert score(integer, answer("3")).correct and score(integer, answer("3.0")).correct
    assert score(integer, answer("3.7")).correct  # str(int(float("3.7"))) == "3", as the official scorer
    assert not score(integer, answer("4")).correct
    flt = make("3", "q", "1.2", [], answer_type="float", precision=1, choice_rule="mathvista")
    assert score(flt, answer("1.23")).correct and score(flt, answer("1.2")).correct
    assert not score(flt, answer("1.26")).correct


def test_mathverse_vision_only_options_given_as_text():
    item = make("v", "According to the image, answer with the option letter", "C", [], multiple_choice=True,
                    answer_type="choice")
    for text in ("C", "(C)", "C: √{3}", "C. \\sqrt{3}", "C:√3", "The answer is C", "option C"):
        assert score(item, answer(text)).correct, text
    assert not score(item, answer("B: √{3}")).correct
    assert extract.named_letter("√{3}") is None and extract.named_letter("3") is None


def test_mmmath_every_boxed_part_within_its_tolerance():
    item = make("m", "q", "3, 4", [], answer_type="boxes", answer_parts=["3", "4"], tolerance=1e-2)
    assert score(item, answer("x=\\boxed{3}, y=\\boxed{4}")).correct
    assert score(item, answer("\\boxed{4}, \\boxed{3}")).correct  # any order, as its judge
    assert score(item, answer("\\boxed{3, 4}")).correct  # one box, parts split at top-level commas
    assert not score(item, answer("\\boxed{4}")).correct  # one part of two
    assert not score(item, answer("\\boxed{3}, \\boxed{4}, \\boxed{5}")).correct
    assert score(item, answer("\\boxed{3.009}, \\boxed{4}")).correct  # within 1e-2
    assert not score(item, answer("\\boxed{3.02}, \\boxed{4}")).correct
    # the boxes of the answer block win over the ones in the reasoning
    assert scoring.predicted_parts("<think>\\boxed{9}</think><answer>\\boxed{3} \\boxed{4}</answer>") == ["3", "4"]
    degrees = make("d", "q", "60^{\\circ}", [], answer_type="boxes", answer_parts=["60^{\\circ}"], tolerance=1e-2)
    assert score(degrees, answer("\\boxed{60°}")).correct
    assert scoring.parts_match(["\\pm 2"], ["+ 2", "- 2"], 1e-2)[0]


def test_dynamath_text_and_choice_rules():
    text = make("t", "q", "The graph is symmetric about the y-axis", [], answer_type="text", choice_rule="dynamath")
    assert score(text, answer("symmetric about the y-axis")).correct  # DynaMath: the answer is in the truth
    assert not score(text, answer("not symmetric at all")).correct
    mc = make("c", "q", "B", [], choices=["sin x", "cos x", "tan x"], multiple_choice=True,
                  answer_type="choice", choice_rule="dynamath")
    assert score(mc, answer("cos x")).correct and score(mc, answer("Option: B")).correct
    assert not score(mc, answer("A or B")).correct
