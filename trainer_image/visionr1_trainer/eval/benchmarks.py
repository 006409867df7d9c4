"""Benchmark rows as ``EvalItem``s: MathVista, MathVerse, MM-Math, DynaMath and our synthetic tasks.

Each format reads rows with the field names of its public data set (``BenchmarkSpec.data``
is a hub name, a local file or directory, or an ``s3://``/``pvc://`` URI, read through
``data.sources``); ``DatasetRef.fieldMap`` renames other data sets' columns to them.

* ``mathvista`` (AI4Math/MathVista, testmini): ``pid``, ``question``, ``image`` /
  ``decoded_image``, ``choices`` (list or null), ``answer`` (an option's *text* for
  multiple choice), ``answer_type`` (text/integer/float/list), ``precision``,
  ``question_type`` (multi_choice/free_form), ``metadata`` {``task``, ``skills``, ...},
  ``query`` (the full prompt). Categories: ``task`` (FQA, GPS, MWP, TQA, VQA) and
  ``skill`` (ALG, ARI, GEO, LOG, NUM, SCI, STA), as the MathVista paper reports them.
* ``mathverse`` (AI4Math/MathVerse, testmini): ``sample_index``, ``problem_index``,
  ``problem_version`` (Text Dominant ... Vision Only), ``question``, ``image``,
  ``answer`` (a letter for multiple choice), ``question_type`` (multi-choice/free-form),
  ``metadata`` {``subject``, ``subfield``...}, ``query_wo``, ``query_cot``,
  ``question_for_eval``. The prompt is ``query_cot``. Options are read from the question's
  text. Categories: ``version`` and ``subject``.
* ``mmmath`` (THU-KEG/MM_Math): ``question``, ``solution`` (the answer is its last
  ``\\boxed{}`` unless an ``answer`` column exists), ``file_name`` / ``image`` /
  ``images``, ``difficult``, ``year`` (grade), ``knowledge``. Categories: ``difficulty``,
  ``grade``, ``knowledge``.
* ``dynamath`` (DynaMath/DynaMath_Sample): ``id``, ``qid``/``varid`` when present,
  ``question``, ``image`` / ``decoded_image``, ``ground_truth`` (or ``answer``),
  ``answer_type`` (multiple choice/float/free form), ``subject``, ``knowledge_level``.
  Float answers are right within 0.001, as DynaMath scores them; the variants of one
  question form a group for its worst-case accuracy. Categories: ``subject``, ``level``.
* ``synthetic`` (``data.synthetic.generate``'s ``eval`` split, the RL schema): ``id``,
  ``images``, ``problem``, ``answer``, ``task``. Categories: ``task``.

A row that cannot be used is skipped and counted by reason (``ReadResult.skipped``), as
the other readers do; ids are made unique. Multiple-choice ground truths are stored as
the option's letter, whatever the benchmark wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..answers import all_boxed_contents, choice_letter
from ..data.formats import DEFAULT_MAX_IMAGE_PIXELS, ReadResult, SkipRow, check_image, load_rgb, max_image_pixels, parse_rows
from ..data.sources import ImageRoots, UnsafePath, cache_root, iter_rows, resolve
from .extract import LETTERS, option_letter, parse_inline_choices

__all__ = ["EvalItem", "FORMATS", "MATHVISTA_SKILLS", "MATHVISTA_TASKS", "load_benchmark"]

log = logging.getLogger(__name__)

# MathVista's task and skill names, abbreviated as its paper (and Vision-R1's) report them.
MATHVISTA_TASKS = {
    "figure question answering": "FQA",
    "geometry problem solving": "GPS",
    "math word problem": "MWP",
    "textbook question answering": "TQA",
    "visual question answering": "VQA",
}
MATHVISTA_SKILLS = {
    "algebraic reasoning": "ALG",
    "arithmetic reasoning": "ARI",
    "geometry reasoning": "GEO",
    "logical reasoning": "LOG",
    "numeric commonsense": "NUM",
    "scientific reasoning": "SCI",
    "statistical reasoning": "STA",
}
DYNAMATH_FLOAT_TOLERANCE = 1e-3
# DynaMath_Sample's ten splits (one variant of each of the 501 seed questions per split),
# stored as data/sample<N>-*.parquet; all ten are read unless a ref names one.
DYNAMATH_SPLITS = tuple(f"sample_variant{n}" for n in range(1, 11))
# MM-Math's judge compares numbers within this absolute tolerance (its eval.py --precision).
MMMATH_TOLERANCE = 1e-2
# The split a row came from, set on each row by load_benchmark (DynaMath's variant).
SPLIT_KEY = "__split__"
# DatasetRef.split's default: when a ref keeps it, the format's own default split is read.
DEFAULT_SPLIT = "train"


@dataclass
class EvalItem:
    """One benchmark question, ready to prompt and score.

    ``question`` is the benchmark's prompt for the model (the eval stage appends the
    output-format instruction); ``answer`` is the ground truth: the option's letter for
    multiple choice, else the answer text. ``precision``: decimals a float answer is
    compared at (MathVista); ``tolerance``: absolute tolerance of a float answer
    (DynaMath). ``categories``: group -> values (a MathVista item has several skills).
    ``group``: items that are variants of one question (DynaMath's worst case).
    """

    id: str
    question: str
    answer: str
    image_paths: list[str]
    choices: list[str] | None = None
    multiple_choice: bool = False
    answer_type: str = "text"
    precision: int | None = None
    tolerance: float | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)
    group: str | None = None
    judge_question: str = ""
    # Every part the answer has (MM-Math: all \\boxed{} of the solution, all must be right).
    answer_parts: list[str] | None = None
    # A benchmark's own fallback when no option is named (``mathvista``: the closest option
    # by edit distance; ``dynamath``: the one option letter the answer contains).
    choice_rule: str | None = None
    # The row's own fields, for a predictions file in the benchmark's submission format.
    problem: dict[str, Any] | None = None

    def load_images(self) -> list:
        return [load_rgb(p) for p in self.image_paths]

    @property
    def reference(self) -> str:
        """The ground truth as a reader (or a judge) wants it: ``B (145°)`` for a choice."""
        if self.multiple_choice and self.choices and self.answer in LETTERS[: len(self.choices)]:
            return f"{self.answer} ({self.choices[LETTERS.index(self.answer)]})"
        return self.answer


@dataclass(frozen=True)
class BenchmarkFormat:
    """How to read one benchmark: a row parser, its public field names, its default split."""

    parse: Callable[[dict, "RowContext", int], EvalItem]
    fields: tuple[str, ...]
    default_split: str | tuple[str, ...] | None = None
    default_subset: str | None = None
    # Read a hub name as the repo's files (MM-Math's hub data set is an image folder).
    hub_files: bool = False
    # Other names of a split's files: ``sample_variant3`` -> ``sample3`` (DynaMath).
    split_aliases: Callable[[str], tuple[str, ...]] | None = None


FORMATS: dict[str, BenchmarkFormat] = {}


def register(name: str, fields: tuple[str, ...], default_split: str | tuple[str, ...] | None = None,
             default_subset: str | None = None, **options: Any):
    def wrap(parse):
        FORMATS[name] = BenchmarkFormat(parse, fields, default_split, default_subset, **options)
        return parse
    return wrap


# --- reading ----------------------------------------------------------------------------


class RowContext:
    """Where a row's images are (``ImageRoots``), the size bound, and whether rows must carry
    an answer (not in ``predictionsOnly`` mode)."""

    def __init__(self, roots: ImageRoots, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 answers_required: bool = True):
        self.roots, self.max_pixels = roots, max_pixels
        self.answers_required = answers_required

    def answer(self, row: dict, keys: str | tuple[str, ...]) -> str:
        """The row's ground truth; "" for a row without one when answers are not required."""
        return _text(row, keys, "empty_answer" if self.answers_required else None) or ""

    def images(self, row: dict, keys: tuple[str, ...], required: bool = True) -> list[str]:
        """Local paths of the images under the first of ``keys`` that holds any."""
        for key in keys:
            value = row.get(key)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            values = [v for v in values if not _empty_image(v)]
            if values:
                return [self._one(v) for v in values]
        if required:
            raise SkipRow("missing_image", f"none of {', '.join(keys)}")
        return []

    def _one(self, value: Any) -> str:
        candidates = [value]
        if isinstance(value, str) and "://" not in value and not value.startswith("/"):
            candidates.append(f"images/{value}")  # MM-Math and MathVista ship images/ beside the rows
        for candidate in candidates:
            try:
                path = self.roots.find(candidate)
            except UnsafePath as exc:
                raise SkipRow("unsafe_image_path", str(exc)) from None
            except LookupError:
                continue
            except TypeError as exc:
                raise SkipRow("wrong_type", str(exc)) from None
            check_image(path, self.max_pixels)
            return path
        raise SkipRow("missing_image", f"no image at {value!r}")


def _empty_image(value: Any) -> bool:
    """No image: null, empty text, or the hub's Image struct with neither bytes nor path."""
    if isinstance(value, dict):
        return not value.get("bytes") and not value.get("path")
    return value is None or value == ""


def load_benchmark(spec, storage=None, cache_dir: str | Path | None = None) -> ReadResult[EvalItem]:
    """The items of ``spec`` (a ``BenchmarkSpec``), broken rows skipped and counted."""
    if spec.format not in FORMATS:
        raise ValueError(f"unknown benchmark format {spec.format!r}; valid: {', '.join(sorted(FORMATS))}")
    fmt, ref = FORMATS[spec.format], spec.data
    split, subset = ref.split, ref.subset
    if split == DEFAULT_SPLIT and fmt.default_split:
        split, subset = fmt.default_split, subset or fmt.default_subset
    splits = (split,) if isinstance(split, str) else tuple(split)
    answers_required = not getattr(spec, "predictions_only", False)
    sources = []
    for name in splits:
        aliases = fmt.split_aliases(name) if fmt.split_aliases else ()
        resolved = resolve(ref.source, name, storage, cache_dir, subset=subset, split_aliases=aliases,
                           hub_files=fmt.hub_files)
        sources.append((name, resolved))
        if resolved.single_file:
            break  # one file named: its rows are read once, whatever the splits
    roots = [ImageRoots(r, cache_root(cache_dir), storage, ref.image_roots) for _, r in sources]

    def rows():
        for (name, resolved), root in zip(sources, roots):
            ctx.roots = root
            for row in iter_rows(resolved, subset, name):
                if isinstance(row, dict):
                    row = {**row, SPLIT_KEY: name}
                yield row

    ctx = RowContext(roots[0], max_image_pixels(ref), answers_required)
    result = parse_rows(rows(), ref, fmt.parse, fmt.fields, ctx)
    for _, resolved in sources:
        result.skipped.update(resolved.skipped)
    level = logging.WARNING if result.skipped else logging.INFO
    log.log(level, "%s (%s, split %s): kept %d of %d rows; skipped %s", ref.source, spec.format, ", ".join(splits),
            len(result.items), result.rows_read, dict(sorted(result.skipped.items())))
    return result


# --- field helpers ----------------------------------------------------------------------


def _text(row: dict, keys: str | tuple[str, ...], empty_reason: str | None = None) -> str | None:
    """The first non-empty scalar among ``keys`` as stripped text; None (or SkipRow) if none."""
    for key in (keys,) if isinstance(keys, str) else keys:
        value = row.get(key)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (str, int, float)):
            raise SkipRow("wrong_type", f"{key!r} is {type(value).__name__}")
        text = str(value).strip()
        if text:
            return text
    if empty_reason is not None:
        raise SkipRow(empty_reason, f"no {keys!r}")
    return None


def _mapping(value: Any) -> dict:
    """A nested metadata object (a dict, or JSON text of one)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _values(value: Any) -> list[str]:
    """A category field as a list of names (one string, or a list of them)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _categories(**groups: list[str]) -> dict[str, list[str]]:
    return {name: values for name, values in groups.items() if values}


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _choices(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise SkipRow("wrong_type", "choices is text, not a list") from None
    if not isinstance(value, (list, tuple)):
        raise SkipRow("wrong_type", f"choices is {type(value).__name__}")
    choices = [str(c).strip() for c in value]
    return choices or None


def _letter_of(answer: str, choices: list[str] | None) -> str:
    """The ground truth's option letter: the option whose text it is, or a letter it is."""
    if choices:
        exact = [i for i, c in enumerate(choices) if c == answer]
        if len(exact) == 1:
            return LETTERS[exact[0]]
        letter = option_letter(answer, choices)
        if letter is not None:
            return letter
    else:
        letter = choice_letter(answer)
        if letter is not None:
            return letter
    raise SkipRow("bad_answer", f"answer {answer!r} is not one of the options")


def _truth_letter(answer: str, choices: list[str] | None) -> str:
    """A multiple-choice ground truth given as a letter (``D``, ``(d)``) or as an option's text."""
    letter = choice_letter(answer)
    if letter is not None and (not choices or LETTERS.index(letter) < len(choices)):
        return letter
    return _letter_of(answer, choices)


# The fields of a MathVista problem its scorer reads from a predictions file.
MATHVISTA_PROBLEM_FIELDS = ("question", "image", "choices", "unit", "precision", "answer", "question_type",
                            "answer_type", "pid", "metadata", "query")


def _problem(row: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """The row's ``keys`` as JSON values (metadata given as JSON text is parsed)."""
    out: dict[str, Any] = {}
    for key in keys:
        value = row.get(key)
        if key == "metadata":
            value = _mapping(value) or None
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        elif not isinstance(value, (str, int, float, bool)) and value is not None:
            value = str(value)
        out[key] = value
    return out


def _row_id(row: dict, keys: tuple[str, ...], index: int) -> str:
    return _text(row, keys) or f"row-{index:08d}"


def _options_text(choices: list[str] | None) -> str:
    if not choices:
        return ""
    return "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


# --- the formats ------------------------------------------------------------------------


@register("mathvista", ("pid", "question", "image", "decoded_image", "choices", "answer", "answer_type",
                        "precision", "question_type", "metadata", "query", "unit"), default_split="testmini")
def parse_mathvista(row: dict, ctx: RowContext, index: int) -> EvalItem:
    question = _text(row, "question", "empty_question")
    answer = ctx.answer(row, "answer")
    choices = _choices(row.get("choices"))
    multiple = row.get("question_type") == "multi_choice" or choices is not None
    if multiple and not choices:
        raise SkipRow("bad_answer", "a multi_choice question without choices")
    meta = _mapping(row.get("metadata"))
    task = [MATHVISTA_TASKS.get(t, t) for t in _values(meta.get("task"))]
    skills = [MATHVISTA_SKILLS.get(s, s) for s in _values(meta.get("skills"))]
    return EvalItem(
        id=_row_id(row, ("pid", "id"), index),
        question=_text(row, "query") or f"Question: {question}{_options_text(choices)}",
        answer=_letter_of(answer, choices) if multiple and answer else answer,
        image_paths=ctx.images(row, ("decoded_image", "image", "images")),
        choices=choices,
        multiple_choice=multiple,
        answer_type="choice" if multiple else str(row.get("answer_type") or "text"),
        precision=_int(row.get("precision")),
        categories=_categories(task=task, skill=skills),
        judge_question=question + _options_text(choices),
        choice_rule="mathvista",
        problem=_problem(row, MATHVISTA_PROBLEM_FIELDS),
    )


@register("mathverse", ("sample_index", "problem_index", "problem_version", "question", "image", "answer",
                        "question_type", "metadata", "query_wo", "query_cot", "question_for_eval"),
          default_split="testmini", default_subset="testmini")
def parse_mathverse(row: dict, ctx: RowContext, index: int) -> EvalItem:
    question = _text(row, "question") or ""
    prompt = _text(row, ("query_cot", "question", "query_wo"), "empty_question")
    answer = ctx.answer(row, "answer")
    choices = parse_inline_choices(question) or parse_inline_choices(prompt)
    qtype = row.get("question_type")
    multiple = qtype == "multi-choice" if qtype else choices is not None and choice_letter(answer) is not None
    meta = _mapping(row.get("metadata"))
    return EvalItem(
        id=_row_id(row, ("sample_index", "id"), index),
        question=prompt,
        answer=_truth_letter(answer, choices) if multiple and answer else answer,
        image_paths=ctx.images(row, ("image", "images"), required=False),  # Text Only has none
        choices=choices if multiple else None,
        multiple_choice=multiple,
        answer_type="choice" if multiple else "text",
        categories=_categories(version=_values(row.get("problem_version")), subject=_values(meta.get("subject"))),
        judge_question=_text(row, "question_for_eval") or question or prompt,
    )


@register("mmmath", ("id", "question", "answer", "solution", "image", "images", "file_name", "difficult",
                     "difficulty", "level", "year", "grade", "knowledge"), hub_files=True)
def parse_mmmath(row: dict, ctx: RowContext, index: int) -> EvalItem:
    question = _text(row, "question", "empty_question")
    answer = _text(row, "answer")
    parts = [answer] if answer is not None else \
        [p.strip() for p in all_boxed_contents(_text(row, "solution") or "") if p.strip()]
    if not parts and ctx.answers_required:
        raise SkipRow("empty_answer", "no 'answer' and no \\boxed{} in 'solution'")
    return EvalItem(
        id=_row_id(row, ("id", "file_name"), index),
        question=question,
        answer=", ".join(parts),
        answer_parts=parts,
        answer_type="boxes",
        tolerance=MMMATH_TOLERANCE,
        image_paths=ctx.images(row, ("images", "image", "file_name")),
        categories=_categories(
            difficulty=_values(_text(row, ("difficult", "difficulty", "level"))),
            grade=_values(_text(row, ("year", "grade"))),
            knowledge=_values(row.get("knowledge")),
        ),
        judge_question=question,
    )


def _dynamath_aliases(split: str) -> tuple[str, ...]:
    """``sample_variant3`` is stored as ``data/sample3-*.parquet``."""
    return (f"sample{split[len('sample_variant'):]}",) if split.startswith("sample_variant") else ()


@register("dynamath", ("id", "qid", "varid", "question", "image", "decoded_image", "ground_truth", "answer",
                       "answer_type", "subject", "knowledge_level", "level"),
          default_split=DYNAMATH_SPLITS, split_aliases=_dynamath_aliases)
def parse_dynamath(row: dict, ctx: RowContext, index: int) -> EvalItem:
    question = _text(row, "question", "empty_question")
    truth = ctx.answer(row, ("ground_truth", "answer"))
    answer_type = (_text(row, "answer_type") or "free form").lower()
    multiple = answer_type == "multiple choice"
    choices = parse_inline_choices(question) if multiple else None
    base_id = _row_id(row, ("qid", "id"), index)
    split = str(row.get(SPLIT_KEY) or "")
    variant = _text(row, "varid") or (split[len("sample_variant"):] if split.startswith("sample_variant") else None)
    return EvalItem(
        id=f"{base_id}-v{variant}" if variant else base_id,
        question=question,
        answer=_truth_letter(truth, choices) if multiple and truth else truth,
        image_paths=ctx.images(row, ("decoded_image", "image", "images")),
        choices=choices,
        multiple_choice=multiple,
        answer_type="choice" if multiple else "float" if answer_type == "float" else "text",
        tolerance=DYNAMATH_FLOAT_TOLERANCE if answer_type == "float" else None,
        categories=_categories(subject=_values(row.get("subject")),
                               level=_values(_text(row, ("knowledge_level", "level")))),
        group=_text(row, ("qid", "id")),
        judge_question=question,
        choice_rule="dynamath",
    )


@register("synthetic", ("id", "problem", "answer", "images", "image", "task"), default_split="eval")
def parse_synthetic(row: dict, ctx: RowContext, index: int) -> EvalItem:
    problem = _text(row, "problem", "empty_question")
    answer = _text(row, "answer", "empty_answer")
    choices = parse_inline_choices(problem)
    multiple = choices is not None and choice_letter(answer) is not None
    return EvalItem(
        id=_row_id(row, ("id",), index),
        question=problem,
        answer=_truth_letter(answer, choices) if multiple else answer,
        image_paths=ctx.images(row, ("images", "image")),
        choices=choices if multiple else None,
        multiple_choice=multiple,
        answer_type="choice" if multiple else "text",
        categories=_categories(task=_values(row.get("task"))),
        judge_question=problem,
    )
