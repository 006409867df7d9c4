"""The three row schemas of the recipe, read and written the same way everywhere.

* Vision-R1-cold (ShareGPT style, LLaMA-Factory's ``sharegpt`` layout): ``conversations``
  with ``from``/``value`` (``human``/``gpt``/``system``) or ``messages`` with
  ``role``/``content`` (``user``/``assistant``/``system``); images in ``images`` (list)
  or ``image`` (one). Read as ``ColdExample``.
* Vision-R1-rl (geometry3k style): ``images`` (list), ``problem`` with ``<image>``,
  ``answer``. Read as ``RLExample`` (the GRPO and eval stages use ``read_rl``).
* Bridging source: ``image``, ``question``, ``answer`` (``DatasetRef.fieldMap`` renames
  other data sets' columns). Read as ``BridgeExample``.

A broken row (missing or unreadable image, empty answer, wrong types, a torn JSON line)
is skipped and counted in ``ReadResult.skipped`` by reason, and the reader logs the
counts: it never crashes a stage and never vanishes silently. Images always come out as
local file paths (bytes and decoded images in a row are written to a cache), so every
consumer loads them the same way.
"""

from __future__ import annotations

import collections
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, TypeVar

from .sources import BadRow, ImageRoots, UnsafePath, cache_root, iter_rows, resolve

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

# Why a row was skipped; the counters use these names (and so do stage summaries).
SKIP_REASONS = (
    "unparsable_row", "not_an_object", "wrong_type", "missing_image", "unreadable_image",
    "image_count_mismatch", "empty_question", "empty_answer", "bad_conversation",
    "unsafe_image_path", "oversized_image", "unsafe_object_key",
)
# Used where a reader is given no bound (the stage configs pass DatasetRef.maxImagePixels).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


class SkipRow(Exception):
    """Raised by a row parser: the row is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_rgb(path: str):
    """One image file as an RGB PIL image, fully decoded."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


@dataclass
class RLExample:
    """A geometry3k-style row: ``problem`` may contain ``<image>``; images are local paths."""

    id: str
    problem: str
    answer: str
    image_paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields

    def load_images(self) -> list:
        return [load_rgb(p) for p in self.image_paths]


@dataclass
class BridgeExample:
    """A Modality Bridging input: image(s), question and ground-truth answer."""

    id: str
    question: str
    answer: str
    image_paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list:
        return [load_rgb(p) for p in self.image_paths]


@dataclass
class ColdExample:
    """A cold-start conversation: ``messages`` are ``{"role", "content"}`` with string content.

    ``<image>`` markers are removed from the content: images are placed at the start of
    the first user turn (Qwen's convention, as ``models.vlm.user_message`` does for RL).
    """

    id: str
    messages: list[dict[str, str]]
    image_paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def response(self) -> str:
        return [m["content"] for m in self.messages if m["role"] == "assistant"][-1]

    def load_images(self) -> list:
        return [load_rgb(p) for p in self.image_paths]


T = TypeVar("T")


@dataclass
class ReadResult(Generic[T]):
    """Parsed rows plus what was skipped, by reason."""

    items: list[T]
    skipped: collections.Counter = field(default_factory=collections.Counter)
    rows_read: int = 0
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows_read, "kept": len(self.items),
                "skipped": dict(sorted(self.skipped.items()))}


# --- field helpers ------------------------------------------------------------------------


def apply_field_map(row: dict, field_map: dict[str, str], expected: Iterable[str]) -> dict:
    """Rename a row's columns to the expected names.

    Either direction is accepted, since both are natural to write: ``{image: img}`` (the
    expected name first, as in the CRD's example) and ``{img: image}``. The side that is
    an expected field name decides.
    """
    if not field_map:
        return row
    expected = set(expected)
    out = dict(row)
    for a, b in field_map.items():
        wanted, theirs = (a, b) if a in expected else (b, a) if b in expected else (None, None)
        if wanted is not None and theirs in row and wanted != theirs:
            out[wanted] = out.pop(theirs)
    return out


def _text(row: dict, key: str, empty_reason: str) -> str:
    value = row.get(key)
    if value is None:
        raise SkipRow(empty_reason, f"no {key!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SkipRow("wrong_type", f"{key!r} is {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise SkipRow(empty_reason, f"{key!r} is empty")
    return text


def _image_values(row: dict, optional: bool = False) -> list:
    for key in ("images", "image"):
        if key in row and row[key] is not None:
            value = row[key]
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if values:
                return values
    if optional:  # a text-only row
        return []
    raise SkipRow("missing_image", "no 'images' or 'image'")


def check_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ``SkipRow`` unless ``path`` is a readable image of at most ``max_pixels``.

    Only the header is read for the size, and ``verify`` checks structure without decoding
    every pixel: a 22 KB PNG can claim 180 megapixels (a decompression bomb), which PIL
    refuses with ``DecompressionBombError`` above twice its own limit and only warns about
    below it. Both, and anything above ``max_pixels``, skip the row as ``oversized_image``.
    """
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise SkipRow("oversized_image", f"{path}: {width}x{height} is above {max_pixels} pixels")
                img.verify()  # structure and checksums, without decoding every pixel
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SkipRow("oversized_image", f"{path}: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise SkipRow("unreadable_image", f"{path}: {exc}") from None


class _RowContext:
    """What row parsers need besides the row: where images live (``ImageRoots``), the bound."""

    def __init__(self, roots: ImageRoots, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.roots, self.max_pixels = roots, max_pixels

    def images(self, row: dict, optional: bool = False) -> list[str]:
        """The row's image paths, found and checked; ``optional``: a row with no image field
        (or an empty one) is text-only, ``[]`` (its markers are checked by the caller)."""
        paths = []
        for value in _image_values(row, optional):
            try:
                path = self.roots.find(value)
            except UnsafePath as exc:
                raise SkipRow("unsafe_image_path", str(exc)) from None
            except LookupError as exc:
                raise SkipRow("missing_image", str(exc)) from None
            except TypeError as exc:
                raise SkipRow("wrong_type", str(exc)) from None
            check_image(path, self.max_pixels)
            paths.append(path)
        return paths


def _check_placeholders(text: str, num_images: int) -> None:
    # LLaMA-Factory rejects a sample whose <image> count differs from its images; none at
    # all is fine (the images go first, Qwen's convention).
    markers = text.count(IMAGE_PLACEHOLDER)
    if markers and markers != num_images:
        raise SkipRow("image_count_mismatch", f"{markers} <image> markers, {num_images} images")


def _meta(row: dict, used: Iterable[str]) -> dict:
    used = set(used)
    return {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool, dict, list))}


# --- row parsers ------------------------------------------------------------------------


def parse_rl_row(row: dict, ctx: _RowContext, index: int) -> RLExample:
    problem = _text(row, "problem", "empty_question")
    answer = _text(row, "answer", "empty_answer")
    images = ctx.images(row)
    _check_placeholders(problem, len(images))
    return RLExample(_row_id(row, index), problem, answer, images,
                     _meta(row, ("id", "problem", "answer", "images", "image")))


def parse_bridge_row(row: dict, ctx: _RowContext, index: int) -> BridgeExample:
    question = _text(row, "question", "empty_question")
    answer = _text(row, "answer", "empty_answer")
    images = ctx.images(row, optional=True)  # text-only rows skip the image description
    _check_placeholders(question, len(images))
    return BridgeExample(_row_id(row, index), question, answer, images,
                         _meta(row, ("id", "question", "answer", "images", "image")))


def parse_cold_row(row: dict, ctx: _RowContext, index: int) -> ColdExample:
    if "conversations" in row and row["conversations"] is not None:
        turns, role_key, text_key = row["conversations"], "from", "value"
    elif "messages" in row and row["messages"] is not None:
        turns, role_key, text_key = row["messages"], "role", "content"
    else:
        raise SkipRow("bad_conversation", "no 'conversations' or 'messages'")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SkipRow("wrong_type", "conversation is not a list of objects")
    messages, markers = [], 0
    for turn in turns:
        role = SHAREGPT_ROLES.get(str(turn.get(role_key)))
        if role is None:
            raise SkipRow("bad_conversation", f"unsupported role {turn.get(role_key)!r}")
        content, images_in_turn = _turn_text(turn.get(text_key))
        markers += images_in_turn + content.count(IMAGE_PLACEHOLDER)
        messages.append({"role": role, "content": content.replace(IMAGE_PLACEHOLDER, "").strip()})
    _check_turns(messages)
    images = ctx.images(row, optional=True)  # text-only rows are part of a cold-start set too
    if markers and markers != len(images):
        raise SkipRow("image_count_mismatch", f"{markers} image markers, {len(images)} images")
    return ColdExample(_row_id(row, index), messages, images,
                       _meta(row, ("id", "conversations", "messages", "images", "image")))


def _turn_text(content: Any) -> tuple[str, int]:
    """(text, number of image parts) of a turn's content: a string or a list of parts."""
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [str(p.get("text", "")) for p in content if p.get("type") == "text"]
        images = sum(1 for p in content if p.get("type") in ("image", "image_url"))
        return "".join(texts), images
    raise SkipRow("wrong_type", f"turn content is {type(content).__name__}")


def _check_turns(messages: list[dict[str, str]]) -> None:
    dialog = [m for m in messages if m["role"] != "system"]
    if not dialog or dialog[0]["role"] != "user":
        raise SkipRow("bad_conversation", "the first non-system turn must be the user's")
    if any(a["role"] == b["role"] for a, b in zip(dialog, dialog[1:])):
        raise SkipRow("bad_conversation", "user and assistant turns must alternate")
    if dialog[-1]["role"] != "assistant":
        raise SkipRow("bad_conversation", "the last turn must be the assistant's")
    if not dialog[0]["content"]:
        raise SkipRow("empty_question", "the user turn is empty")
    if any(not m["content"] for m in dialog if m["role"] == "assistant"):
        raise SkipRow("empty_answer", "an assistant turn is empty")


def _row_id(row: dict, index: int) -> str:
    value = row.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return f"row-{index:08d}"


# --- readers ------------------------------------------------------------------------------

SCHEMAS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "rl": (parse_rl_row, ("id", "problem", "answer", "images", "image")),
    "cold": (parse_cold_row, ("id", "conversations", "messages", "images", "image")),
    "bridge": (parse_bridge_row, ("id", "question", "answer", "images", "image")),
}
# Where ``DatasetRef.conversation`` puts the first user turn, per schema.
QUESTION_FIELD = {"rl": "problem", "bridge": "question"}


def read_dataset(ref, schema: str, storage=None, cache_dir: str | Path | None = None) -> ReadResult:
    """Read ``ref`` (a ``DatasetRef``) as ``schema`` (``rl``, ``cold`` or ``bridge``).

    A cold-start set named by its hub name is fetched as the repo's files and read as a
    mirror is (Vision-R1-cold's two JSON files are one data set, not one table).
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; valid: {', '.join(SCHEMAS)}")
    parse, expected = SCHEMAS[schema]
    conversation = getattr(ref, "conversation", None)
    if conversation is not None:
        if schema not in QUESTION_FIELD:
            raise ValueError(f"conversation: the {schema} schema reads conversations itself; drop the setting")
        parse = _from_conversation(parse, conversation, QUESTION_FIELD[schema])
    resolved = resolve(ref.source, ref.split, storage, cache_dir, subset=ref.subset, hub_files=schema == "cold")
    ctx = _RowContext(ImageRoots(resolved, cache_root(cache_dir), storage, getattr(ref, "image_roots", ())),
                      max_image_pixels(ref))
    result = parse_rows(iter_rows(resolved, ref.subset, ref.split), ref, parse, expected, ctx)
    result.skipped.update(resolved.skipped)
    _log_result(result, schema)
    return result


def conversation_row(row: dict, turns_field: str, images_field: str, question_field: str) -> dict:
    """A conversation row as ``{question_field, answer, images}``: the first user turn is the
    question (``<image>`` markers removed), the last assistant turn the answer."""
    turns = row.get(turns_field)
    if turns is None:
        raise SkipRow("bad_conversation", f"no {turns_field!r}")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SkipRow("wrong_type", f"{turns_field!r} is not a list of objects")
    messages = []
    for turn in turns:
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = SHAREGPT_ROLES.get(str(turn.get(role_key)))
        if role is None:
            raise SkipRow("bad_conversation", f"unsupported role {turn.get(role_key)!r}")
        content, _ = _turn_text(turn.get(text_key))
        messages.append({"role": role, "content": content.replace(IMAGE_PLACEHOLDER, "").strip()})
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not users or not users[0]:
        raise SkipRow("empty_question", "no user turn with text")
    if not answers or not answers[-1]:
        raise SkipRow("empty_answer", "no assistant turn with text")
    out = {k: v for k, v in row.items() if k not in (turns_field, images_field)}
    out.update({question_field: users[0], "answer": answers[-1], "images": row.get(images_field)})
    return out


def _from_conversation(parse, conversation, question_field: str):
    def parse_conversation(row: dict, ctx, index: int):
        return parse(conversation_row(row, conversation.field, conversation.images, question_field), ctx, index)
    return parse_conversation


def max_image_pixels(ref) -> int:
    """The ref's image size bound (``DatasetRef.maxImagePixels``), or the default."""
    return getattr(ref, "max_image_pixels", None) or DEFAULT_MAX_IMAGE_PIXELS


def parse_rows(rows, ref, parse, fields, ctx) -> ReadResult:
    """Parse raw rows into items: at most ``ref.limit`` rows read, ``ref.field_map``
    applied, broken rows skipped and counted by reason, ids kept unique."""
    result: ReadResult = ReadResult([], source=ref.source)
    seen_ids: collections.Counter = collections.Counter()
    for index, row in enumerate(rows):
        if ref.limit is not None and result.rows_read >= ref.limit:
            break
        result.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise SkipRow(row.reason, row.detail)
            item = parse(apply_field_map(row, ref.field_map, fields), ctx, index)
        except SkipRow as skip:
            result.skipped[skip.reason] += 1
            log.debug("%s row %d skipped: %s", ref.source, index, skip)
            continue
        seen_ids[item.id] += 1
        if seen_ids[item.id] > 1:  # ids key resumable work, outputs and records: keep them unique
            item.id = f"{item.id}#{seen_ids[item.id]}"
        result.items.append(item)
    return result


def _log_result(result: ReadResult, schema: str) -> None:
    if result.skipped:
        log.warning("%s (%s): kept %d of %d rows; skipped %s", result.source, schema,
                    len(result.items), result.rows_read, dict(sorted(result.skipped.items())))
    else:
        log.info("%s (%s): %d rows", result.source, schema, len(result.items))


def read_rl(ref, storage=None, cache_dir: str | Path | None = None) -> ReadResult[RLExample]:
    """The RL set (geometry3k format): what the GRPO and eval stages train and score on."""
    return read_dataset(ref, "rl", storage, cache_dir)


def read_cold(ref, storage=None, cache_dir: str | Path | None = None) -> ReadResult[ColdExample]:
    """A cold-start set (Vision-R1-cold, ShareGPT or messages layout)."""
    return read_dataset(ref, "cold", storage, cache_dir)


def read_bridge_source(ref, storage=None, cache_dir: str | Path | None = None) -> ReadResult[BridgeExample]:
    """Image/question/answer rows for Modality Bridging."""
    return read_dataset(ref, "bridge", storage, cache_dir)


# --- writers ------------------------------------------------------------------------------

# The answer format Vision-R1 trains and rewards (HFRRF checks it).
RESPONSE_TEMPLATE = "<think>{reasoning}</think><answer> Final Answer:{answer} </answer>"


def format_response(reasoning: str, answer: str) -> str:
    """A cold-start target: ``<think>{reasoning}</think><answer> Final Answer:{answer} </answer>``."""
    return RESPONSE_TEMPLATE.format(reasoning=reasoning.strip(), answer=answer.strip())



def _with_placeholders(text: str, num_images: int) -> str:
    return text if IMAGE_PLACEHOLDER in text else IMAGE_PLACEHOLDER * num_images + text


def cold_row(id: str, question: str, response: str, images: list[str], system: str | None = None,
             **extra: Any) -> dict:
    """A Vision-R1-cold row (LLaMA-Factory sharegpt: ``conversations`` + ``images``)."""
    turns = [{"from": "system", "value": system}] if system else []
    turns += [{"from": "human", "value": _with_placeholders(question, len(images))},
              {"from": "gpt", "value": response}]
    return {"id": id, "images": list(images), "conversations": turns, **extra}


def rl_row(id: str, problem: str, answer: str, images: list[str], **extra: Any) -> dict:
    """A Vision-R1-rl row (geometry3k: ``images``, ``problem`` with ``<image>``, ``answer``)."""
    return {"id": id, "images": list(images), "problem": _with_placeholders(problem, len(images)),
            "answer": answer, **extra}


def bridge_row(id: str, image: str, question: str, answer: str, **extra: Any) -> dict:
    """A bridging source row."""
    return {"id": id, "image": image, "question": question, "answer": answer, **extra}


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as jsonl, json or parquet (by the file's suffix)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        raise ValueError(f"{path}: write .jsonl, .json or .parquet")
    return path
