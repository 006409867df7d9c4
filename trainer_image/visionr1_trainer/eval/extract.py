"""Pull a benchmark answer out of a model's completion.

``extract_answer(completion, choices=None)`` is the one entry point (the eval stage, the
judge prompts and other checks call it). It looks, in this order, at

1. the last ``<answer>...</answer>`` block (Vision-R1's output format,
   ``<answer> Final Answer:X </answer>``): the text after its ``Final Answer:``, else its
   last ``\\boxed{}``, else its whole content;
2. the last complete ``\\boxed{...}`` anywhere;
3. the last non-empty line, when it reads ``Answer: X`` or ``... the answer is X``.

The first source that yields a non-empty answer wins. The answer is tidied by
``answers.normalize_answer`` (whitespace, ``$`` delimiters, a wrapping ``\\boxed{}`` or
``\\text{}``, a trailing period). With ``choices`` (the options in order, ``A`` first)
the answer is mapped to the chosen option's letter: a letter alone (``B``, ``(b)``,
``B.``), a letter leading the option (``(B) 145°``, ``B: 145``), ``option B``, the text
of exactly one option (``145°``, any case and spacing), or the number of exactly one
numeric option (``145`` for ``145°``). Anything else is None: a guess is never made.

The helpers only cut strings in linear time (``answers`` holds the shared pieces) and
``extract_answer`` never raises: a broken completion is an unanswered sample.
"""

from __future__ import annotations

import logging
import re
import string
from typing import Sequence

from ..answers import extract_final_answer, last_boxed_content, normalize_answer
from ..grpo.reward import answer_block

__all__ = ["answer_text", "closest_option", "dynamath_letter", "edit_distance", "extract_answer", "named_letter", "option_letter",
           "parse_inline_choices", "parse_number"]

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
# "answer:" / "answer is" / "answer is:" (the last one on the line counts). One `\s*` per
# gap and no nested quantifiers: linear on any input.
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b\s*[:：]?|[:：])", re.IGNORECASE)
# A letter alone: "B", "(b)", "B.", "B)", "B:".
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
# A letter leading more text: "(B) 145°", "B. 145", "B: 145", "B) 145", "B, 145".
_LEADING_LETTER = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.:),])\s")
# "option B", "choice (c)".
_NAMED_LETTER = re.compile(r"(?:option|choice)\s*\(?([A-Za-z])\)?\.?", re.IGNORECASE)
# A number with an optional unit, degree or percent sign after it.
_NUMBER = re.compile(
    r"([-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+))\s*"
    r"(?:°|\^\s*\{?\\circ\}?|\\%|%|\\?(?:text|mathrm)\{\s*[A-Za-z]+\s*\}|[A-Za-z]{1,5}(?:\^?[23])?)?"
)
# Where a question lists its options: "Choices:" (MathVista, MathVerse, our synthetic
# tasks) or "Options:".
_CHOICES_HEADER = re.compile(r"(?:choices|options)\s*[:：]", re.IGNORECASE)
# One option per line: "A:40°", "A. 40", "(A) 40", "A) 40".
_LINE_OPTION = re.compile(r"^[ \t]*\(?([A-H])\)?[ \t]*[:：.)][ \t]*", re.MULTILINE)
# Options inline: "(A) red (B) green".
_PAREN_OPTION = re.compile(r"\(([A-H])\)[ \t]*")
# A capital letter leading an option's text, as a model copies an option it cannot see
# listed (MathVerse Vision Only): "C: √{3}", "C. \sqrt{3}", "(C) 2", "C) 2", "C:2".
_LETTER_THEN_TEXT = re.compile(r"(?:\(([A-H])\)|([A-H])\s*[.:：)])\s*\S")
# MathVista's scorer: the first "(X)" in the extraction is the letter.
_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")
# Longest text compared by edit distance (quadratic in length; options are short).
_EDIT_DISTANCE_CAP = 256


def extract_answer(completion: str, choices: list[str] | None = None) -> str | None:
    """The answer in ``completion``: an option letter with ``choices``, else the answer text.

    None when the completion holds no answer (or, with ``choices``, none that names
    exactly one option). Never raises.
    """
    try:
        text = answer_text(completion)
        if text is None or choices is None:
            return text
        return option_letter(text, choices)
    except Exception:  # a malformed completion is an unanswered sample, never a crash
        log.debug("answer extraction failed", exc_info=True)
        return None


def answer_text(completion: str) -> str | None:
    """The tidied answer text, by the order of preference in the module docstring."""
    if not isinstance(completion, str):
        return None
    block = answer_block(completion)
    if block is not None:
        found = _tidy(extract_final_answer(block))
        if found:
            return found
    boxed = last_boxed_content(completion)
    if boxed is not None:
        found = _tidy(boxed)
        if found:
            return found
    return _tidy(_last_line_answer(completion))


def _last_line_answer(completion: str) -> str | None:
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    last = None
    for last in _ANSWER_PHRASE.finditer(lines[-1]):
        pass
    return None if last is None else lines[-1][last.end():]


def _tidy(text: str | None) -> str | None:
    if text is None:
        return None
    text = normalize_answer(text)
    return text or None


def _fold(text: str) -> str:
    """Text for comparing an answer with an option: tidied, one space, any case."""
    return " ".join(normalize_answer(text).split()).casefold()


def parse_number(text: str) -> float | None:
    """The value of a plain number with an optional unit, degree or percent sign (``145°``,
    ``1,200``, ``12 cm``), or None."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:
        return None


def option_letter(text: str, choices: Sequence[str]) -> str | None:
    """The letter of the option that ``text`` names, or None (see the module docstring)."""
    count = min(len(choices), len(LETTERS))
    if count == 0:
        return None

    def letter(found: str) -> str | None:
        index = LETTERS.index(found.upper())
        return LETTERS[index] if index < count else None

    text = normalize_answer(text)
    if (match := _BARE_LETTER.fullmatch(text)) is not None:
        return letter(match.group(1))
    folded = _fold(text)
    same_text = [i for i in range(count) if _fold(str(choices[i])) == folded]
    if len(same_text) == 1:
        return LETTERS[same_text[0]]
    if (match := _LEADING_LETTER.match(text + " ")) is not None:
        return letter(match.group(1) or match.group(2))
    head, _, rest = text.partition(" ")
    if len(head) == 1 and head.isalpha() and (chosen := letter(head)) is not None \
            and _fold(rest) == _fold(str(choices[LETTERS.index(chosen)])):
        return chosen  # "B 145°": the letter, then that option's own text
    if (match := _NAMED_LETTER.fullmatch(text)) is not None:
        return letter(match.group(1))
    value = parse_number(text)
    if value is not None:
        same_value = [i for i in range(count) if parse_number(normalize_answer(str(choices[i]))) == value]
        if len(same_value) == 1:
            return LETTERS[same_value[0]]
    return None


def parse_inline_choices(question: str) -> list[str] | None:
    """The options a question lists in its text (``Choices:\\nA:40°\\nB:60°``), or None.

    Options must run ``A``, ``B``, ... from ``A``; at least two are needed. They are read
    after the last ``Choices:``/``Options:`` header when there is one, one per line
    (``A:``, ``A.``, ``(A)``, ``A)``) or inline (``(A) red (B) green``).
    """
    if not isinstance(question, str):
        return None
    header = None
    for header in _CHOICES_HEADER.finditer(question):
        pass
    region = question[header.end():] if header is not None else question
    for pattern in (_LINE_OPTION, _PAREN_OPTION):
        marks = []
        for mark in pattern.finditer(region):
            if mark.group(1) != LETTERS[len(marks)]:
                if marks:
                    break
                continue  # text before option A
            marks.append(mark)
            if len(marks) == 8:
                break
        if len(marks) < 2:
            continue
        options = [region[a.end():b.start()] for a, b in zip(marks, marks[1:])]
        options.append(region[marks[-1].end():].split("\n", 1)[0])
        return [option.strip() for option in options]
    return None


def named_letter(text: str, count: int = 8) -> str | None:
    """The option letter ``text`` names when the options are not known (they are inside the
    image): a letter alone (``C``, ``(c)``), a capital letter leading an option's text
    (``C: √{3}``, ``C. \\sqrt{3}``), ``option C``, or ``the answer is C``. None otherwise."""
    text = normalize_answer(text)
    for candidate in (text, _after_answer_phrase(text)):
        if not candidate:
            continue
        if (match := _BARE_LETTER.fullmatch(candidate)) is not None:
            found = match.group(1).upper()
        elif (match := _LETTER_THEN_TEXT.match(candidate)) is not None:
            found = match.group(1) or match.group(2)
        elif (match := _NAMED_LETTER.fullmatch(candidate)) is not None:
            found = match.group(1).upper()
        else:
            continue
        return found if LETTERS.index(found) < count else None
    return None


def _after_answer_phrase(text: str) -> str | None:
    """The text after the last "answer is"/"answer:" in ``text`` (``The answer is B``)."""
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    return None if last is None else normalize_answer(text[last.end():])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), each side cut to
    ``_EDIT_DISTANCE_CAP`` characters so a long completion stays cheap."""
    a, b = a[:_EDIT_DISTANCE_CAP], b[:_EDIT_DISTANCE_CAP]
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def closest_option(text: str, choices: Sequence[str]) -> str | None:
    """MathVista's fallback for an extraction that names no option: the first ``(X)`` in it
    is the letter; else the answer after "the answer is"; else the option closest to the
    text by edit distance (the first on ties), as its ``calculate_score.py`` does."""
    count = min(len(choices), len(LETTERS))
    if count == 0 or not isinstance(text, str):
        return None
    if (match := _PAREN_LETTER.search(text)) is not None and LETTERS.index(match.group(1).upper()) < count:
        return match.group(1).upper()
    tail = _after_answer_phrase(text)
    if tail:
        letter = option_letter(tail, choices)
        if letter is not None:
            return letter
    distances = [edit_distance(text.strip(), str(choices[i])) for i in range(count)]
    return LETTERS[distances.index(min(distances))]


def dynamath_letter(text: str, count: int = 5) -> str | None:
    """DynaMath's rule: the one letter of A-E that the upper-cased answer contains, if one."""
    upper = text.upper()
    present = [c for c in LETTERS[: min(count, 5)] if c in upper]
    return present[0] if len(present) == 1 else None
