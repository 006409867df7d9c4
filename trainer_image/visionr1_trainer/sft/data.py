"""Cold-start conversations as training sequences: the model's chat template, labels on
the assistant's tokens only, images through the model's image processor.

A conversation is rendered with the tokenizer's chat template one turn at a time: the
text up to each assistant reply (system, user turns, ``<|im_start|>assistant\\n``) is
context (label -100), the reply with its ``<|im_end|>\\n`` is trained on, as
LLaMA-Factory does for Qwen. The images go at the start of the first user turn, as in
``models.vlm.user_message``, so SFT prompts look exactly like the GRPO and eval
prompts. Each image is resized as LLaMA-Factory resizes it (``sft.images``: at most
``imageMaxPixels``, extreme aspect ratios squeezed to 180:1) and its ``<|image_pad|>`` is
expanded to the number of tokens the image processor will produce for that size,
computed from the image's header without decoding it. A text-only conversation (no
images) is a plain text sample.

``cutoffLength``: a sample longer than the cutoff is cut at the end of its reply; one
whose images or whose first reply token would fall beyond the cutoff is dropped (cutting
into image tokens breaks the model; a sample with nothing to learn is useless), and
counted. An image the processor cannot take is dropped with its sample and counted as
``bad_image``, never raised: one odd image must not stop the stage on every rank.

The encoded set is held compactly (``EncodedSet``: flat int32 token and bool label
arrays, about 5 bytes a token instead of ~70 in Python lists) and saved with the stage's
work (``sft.cache``), so a restarted stage does not tokenise again. Batches and packing
are in ``sft.batches``.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..models.vlm import IMAGE_TOKEN, QWEN_VL_CHAT_TEMPLATE, expand_image_tokens, user_message
from .images import ImageBounds, preprocess_size

IGNORE_INDEX = -100


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class EncodedSample:
    """One training sequence: ``labels[t]`` is ``input_ids[t]`` where it carries loss, else -100.

    ``input_ids``, ``labels``: (T,) int32 arrays.
    """

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    image_paths: list[str]
    image_tokens: list[int]  # tokens each image expands to, in order
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


# --- template ------------------------------------------------------------------------------


def chat_messages(messages: Sequence[dict[str, str]], num_images: int) -> list[dict[str, Any]]:
    """``ColdExample.messages`` in the model's chat form: images in the first user turn."""
    out, placed = [], False
    for m in messages:
        if m["role"] == "user" and not placed:
            out.append(user_message(m["content"], num_images))
            placed = True
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def conversation_segments(tokenizer, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces whose concatenation is the rendered conversation.

    Built by rendering growing prefixes of the conversation; a template that rewrites
    earlier turns (some strip past reasoning) cannot be split this way and is refused.
    """
    template = tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE

    def render(turns, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(turns), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise SkipSample("template_not_incremental")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def image_token_count(path: str, image_processor, bounds: ImageBounds = ImageBounds()) -> int:
    """Tokens one image becomes after LLaMA-Factory's resize, the processor's and the 2x2 merge.

    Raises ``SkipSample("bad_image")`` when the processor refuses the resized image (an
    aspect ratio ``smart_resize`` cannot take, a degenerate size).
    """
    from PIL import Image

    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    with Image.open(path) as img:
        width, height = preprocess_size(*img.size, bounds)
    try:
        if hasattr(image_processor, "get_number_of_image_patches"):
            patches = image_processor.get_number_of_image_patches(height, width, {})
        else:
            from .batches import load_image

            feats = image_processor(images=[load_image(path, bounds)], return_tensors="pt")
            patches = int(feats["image_grid_thw"].prod())
    except ValueError:
        raise SkipSample("bad_image") from None
    return patches // merge**2


# --- one sample -----------------------------------------------------------------------------


def encode_example(example, tokenizer, image_processor, cutoff_length: int,
                   bounds: ImageBounds = ImageBounds()) -> EncodedSample:
    """A ``ColdExample`` as token ids and labels; raises ``SkipSample`` when unusable."""
    counts = [image_token_count(p, image_processor, bounds) for p in example.image_paths]
    segments = conversation_segments(tokenizer, chat_messages(example.messages, len(counts)))
    input_ids: list[int] = []
    labels: list[int] = []
    used = 0
    for text, trained in segments:
        slots = text.count(IMAGE_TOKEN)
        if slots:
            text = expand_image_tokens(text, counts[used:used + slots])
            used += slots
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if used != len(counts):
        raise SkipSample("image_count_mismatch")
    sample = EncodedSample(example.id, np.asarray(input_ids, dtype=np.int32), np.asarray(labels, dtype=np.int32),
                           list(example.image_paths), counts)
    return apply_cutoff(sample, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cutoff_length)


def apply_cutoff(sample: EncodedSample, image_token_id: int, cutoff_length: int) -> EncodedSample:
    """Cut a long sample at ``cutoff_length`` when that keeps its images and some labels."""
    if len(sample) <= cutoff_length:
        return sample
    images = np.flatnonzero(sample.input_ids == image_token_id)
    labelled = np.flatnonzero(sample.labels != IGNORE_INDEX)
    last_image = int(images[-1]) if len(images) else -1
    first_label = int(labelled[0]) if len(labelled) else len(sample)
    # The label at position t is predicted from position t-1: keep at least one pair.
    if last_image >= cutoff_length or first_label >= cutoff_length:
        raise SkipSample("too_long")
    return EncodedSample(sample.id, sample.input_ids[:cutoff_length], sample.labels[:cutoff_length],
                         sample.image_paths, sample.image_tokens, truncated=True)


@dataclass
class EncodedSet:
    """Every encoded sample of the stage in flat arrays (no Python object per token).

    ``tokens`` (N,) int32 and ``trained`` (N,) bool hold all samples end to end; sample
    ``i`` is ``offsets[i]:offsets[i + 1]``. ``image_tokens`` (M,) int32 with
    ``image_offsets`` (n + 1,) likewise; ``source_index`` (n,) is each sample's index in
    the examples it was encoded from (its images are that example's).
    """

    ids: list[str]
    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    image_tokens: np.ndarray
    image_offsets: np.ndarray
    source_index: np.ndarray
    truncated: np.ndarray
    image_paths: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> EncodedSample:
        """Sample ``i``; its arrays are views into the set's."""
        tokens = self.tokens[self.offsets[i]:self.offsets[i + 1]]
        labels = np.where(self.trained[self.offsets[i]:self.offsets[i + 1]], tokens, IGNORE_INDEX).astype(np.int32)
        counts = self.image_tokens[self.image_offsets[i]:self.image_offsets[i + 1]].tolist()
        return EncodedSample(self.ids[i], tokens, labels, self.image_paths[i], counts, bool(self.truncated[i]))

    @classmethod
    def from_samples(cls, samples: Sequence[EncodedSample], source_index: Sequence[int]) -> "EncodedSet":
        def offsets(sizes):
            return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

        cat = (lambda arrays, dtype: np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype))
        return cls(
            ids=[s.id for s in samples],
            tokens=cat([s.input_ids for s in samples], np.int32),
            trained=cat([s.labels != IGNORE_INDEX for s in samples], bool),
            offsets=offsets([len(s) for s in samples]),
            image_tokens=np.asarray([n for s in samples for n in s.image_tokens], dtype=np.int32),
            image_offsets=offsets([len(s.image_tokens) for s in samples]),
            source_index=np.asarray(source_index, dtype=np.int64),
            truncated=np.asarray([s.truncated for s in samples], dtype=bool),
            image_paths=[list(s.image_paths) for s in samples],
        )

    def save(self, directory: Path) -> None:
        """``arrays.npz`` and ``ids.json`` in ``directory`` (the image paths are not saved:
        they are local to each node, and come back from the examples on ``load``)."""
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "arrays.npz", tokens=self.tokens, trained=self.trained, offsets=self.offsets,
                 image_tokens=self.image_tokens, image_offsets=self.image_offsets,
                 source_index=self.source_index, truncated=self.truncated)
        (directory / "ids.json").write_text(json.dumps(self.ids))

    @classmethod
    def load(cls, directory: Path, examples: Sequence[Any]) -> "EncodedSet":
        """A saved set, its image paths from ``examples`` (the ones it was encoded from)."""
        with np.load(directory / "arrays.npz") as arrays:
            loaded = {k: arrays[k] for k in arrays.files}
        ids = json.loads((directory / "ids.json").read_text())
        index = loaded["source_index"]
        if len(index) and (index.max() >= len(examples) or [examples[j].id for j in index] != ids):
            raise ValueError(f"{directory}: the saved encoding is of other examples")
        return cls(ids=ids, image_paths=[list(examples[j].image_paths) for j in index], **loaded)


def encode_all(examples, tokenizer, image_processor, cutoff_length: int,
               bounds: ImageBounds = ImageBounds()) -> tuple[list[EncodedSample], collections.Counter, list[int]]:
    """Every example encoded; the skipped ones counted by reason (``truncated`` is kept);
    and each kept sample's index in ``examples``."""
    samples, counts, index = [], collections.Counter(), []
    for i, example in enumerate(examples):
        try:
            sample = encode_example(example, tokenizer, image_processor, cutoff_length, bounds)
        except SkipSample as skip:
            counts[skip.reason] += 1
            continue
        counts["truncated"] += sample.truncated
        samples.append(sample)
        index.append(i)
    return samples, counts, index


@dataclass
class TrainingData:
    """Encoded samples, their grouping into sequences, and what was dropped."""

    samples: EncodedSet
    groups: list[list[int]]
    skipped: collections.Counter = field(default_factory=collections.Counter)
    packed: bool = False

    def group(self, index: int) -> list[EncodedSample]:
        return [self.samples.sample(i) for i in self.groups[index]]


def build_training_data(examples, tokenizer, image_processor, cutoff_length: int, packing: bool,
                        bounds: ImageBounds = ImageBounds(), encoded: EncodedSet | None = None,
                        skipped: collections.Counter | None = None) -> TrainingData:
    """Encode ``examples`` (or take the already ``encoded`` set) and group them into sequences."""
    from .batches import pack

    if encoded is None:
        samples, skipped, index = encode_all(examples, tokenizer, image_processor, cutoff_length, bounds)
        encoded = EncodedSet.from_samples(samples, index)
    lengths = encoded.lengths().tolist()
    groups = pack(lengths, cutoff_length) if packing else [[i] for i in range(len(encoded))]
    return TrainingData(encoded, groups, skipped or collections.Counter(), packed=packing)
