"""Pull the final answer out of a model's answer text, and put answers in a comparable form.

Small pure functions shared by the GRPO reward (the Hard Format Result Reward Function,
HFRRF, of Vision-R1, arXiv 2503.06749) and the evaluation stage. They only cut and tidy
strings; deciding whether two answers are mathematically equal is the reward's job
(``visionr1_trainer.grpo.reward``).

Every function here runs in time linear in its input (no backtracking regular
expressions over model output), so they are safe on hostile, megabyte-long completions.
"""

from __future__ import annotations

import re

__all__ = [
    "FINAL_ANSWER_MARKER",
    "after_final_answer",
    "all_boxed_contents",
    "choice_letter",
    "extract_final_answer",
    "last_boxed_content",
    "normalize_answer",
    "unwrap_command",
]

FINAL_ANSWER_MARKER = "final answer:"

_FINAL_ANSWER = re.compile(re.escape(FINAL_ANSWER_MARKER), re.IGNORECASE)
# `\boxed{` with optional spaces before the brace (`\boxed {x}` is valid LaTeX).
_BOXED = re.compile(r"\\boxed\s*\{")
# A multiple-choice letter alone: "B", "(b)", "B.", "b)", "(B)." — nothing else around it.
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?\.?")
# Math delimiters that may wrap a whole answer: $$..$$, $..$, \(..\), \[..\].
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Commands whose argument *is* the answer when they wrap all of it.
_WRAPPERS = ("boxed", "text", "textbf", "mathrm", "mathbf")
# Enough for `$\boxed{\text{(B)}}$.`; a cap keeps 500 nested boxes linear, not quadratic.
_NORMALIZE_ROUNDS = 8


def after_final_answer(text: str) -> str | None:
    """The text after the last ``Final Answer:`` (any case), or None without one.

    >>> after_final_answer("x. Final answer: 3. FINAL ANSWER: 4")
    ' 4'
    """
    # Matched in place, not via text.lower(): lowering can change the length ("İ" -> "i̇").
    last = None
    for last in _FINAL_ANSWER.finditer(text):
        pass
    return None if last is None else text[last.end():]


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_at``, or -1 if it is never closed.

    ``\\{`` and ``\\}`` (escaped braces) do not count.
    """
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character: \{ \} \\ are not structure
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed_content(text: str) -> str | None:
    """The content of the last complete top-level ``\\boxed{...}``, or None without one.

    Braces must balance, and nested braces inside the box are kept:
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box inside a box belongs to its outer
    box (``\\boxed{\\boxed{1}}`` gives ``\\boxed{1}``, which ``normalize_answer`` unwraps). A
    box left unclosed at the end is ignored. One left-to-right pass: linear time.

    >>> last_boxed_content(r"try \\boxed{1}, then \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    """
    found = None
    pos = 0
    while (match := _BOXED.search(text, pos)) is not None:
        close = _closing_brace(text, match.end() - 1)
        if close < 0:
            break
        found = text[match.end():close]
        pos = close + 1
    return found


def all_boxed_contents(text: str) -> list[str]:
    """The contents of every complete top-level ``\\boxed{...}``, in order (MM-Math's judge
    scores all of them). Same scan as ``last_boxed_content``: linear time.

    >>> all_boxed_contents(r"x=\\boxed{1}, y=\\boxed{\\frac{1}{2}}")
    ['1', '\\\\frac{1}{2}']
    """
    found = []
    pos = 0
    while (match := _BOXED.search(text, pos)) is not None:
        close = _closing_brace(text, match.end() - 1)
        if close < 0:
            break
        found.append(text[match.end():close])
        pos = close + 1
    return found


def extract_final_answer(answer_text: str) -> str:
    """The final answer inside an ``<answer>`` block's content.

    The text after the last ``Final Answer:`` if there is one, else the whole content;
    then, if that holds a ``\\boxed{...}``, the content of its last box. This refines the
    plain order "Final Answer, else last box, else everything" only where both appear
    (``Final Answer: \\boxed{5}`` gives ``5``). The result is stripped, not normalised.
    """
    tail = after_final_answer(answer_text)
    text = answer_text if tail is None else tail
    boxed = last_boxed_content(text)
    return (text if boxed is None else boxed).strip()


def unwrap_command(text: str, names: tuple[str, ...] = _WRAPPERS) -> str:
    """The argument of ``\\name{...}`` when that command wraps all of ``text``, else ``text``.

    >>> unwrap_command(r"\\text{red}"), unwrap_command(r"\\text{5} cm")
    ('red', '\\\\text{5} cm')
    """
    for name in names:
        head = "\\" + name
        if text.startswith(head):
            brace = len(head)
            while brace < len(text) and text[brace] == " ":
                brace += 1
            if brace < len(text) and text[brace] == "{" and _closing_brace(text, brace) == len(text) - 1:
                return text[brace + 1:-1].strip()
    return text


def _strip_delimiters(text: str) -> str:
    for left, right in _DELIMITERS:
        inner = text[len(left):len(text) - len(right)]
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right) \
                and left not in inner:
            return inner.strip()
    return text


def normalize_answer(text: str) -> str:
    """A modest clean-up applied to both sides before comparing.

    Strips whitespace and Markdown bold (``**5**``), math delimiters around the whole answer
    (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``), a trailing period, and a
    ``\\boxed``/``\\text``/``\\mathrm``/``\\mathbf``/``\\textbf`` that wraps everything;
    turns the Unicode minus ``−`` into ``-``. Units, degrees and percentages are left to
    math-verify. Repeats until nothing changes, at most ``_NORMALIZE_ROUNDS`` times (each
    round is linear; real answers need one or two).

    >>> normalize_answer(r" $\\boxed{\\frac{1}{2}}$. ")
    '\\\\frac{1}{2}'
    """
    text = text.replace("\u2212", "-")
    for _ in range(_NORMALIZE_ROUNDS):
        previous = text
        text = text.strip().strip("*").strip()
        text = _strip_delimiters(text)
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        text = unwrap_command(text)
        if text == previous:
            break
    return text


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter (upper case) that ``text`` is, or None.

    Accepts ``A`` to ``E`` in either case, alone, optionally in parentheses and/or with a
    trailing period, after ``normalize_answer``: ``B``, ``(b)``, ``b.``, ``\\text{(B)}``.
    Anything else (``2``, ``B 12``, ``AB``) is not a letter.

    >>> choice_letter("(b)"), choice_letter("2")
    ('B', None)
    """
    match = _CHOICE.fullmatch(normalize_answer(text))
    return match.group(1).upper() if match else None
