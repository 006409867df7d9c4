"""Cold-start conversations as training sequences: the model's chat template, labels on
the assistant's tokens only, images through the model's image processor.

A conversation is rendered with the tokenizer's chat template one turn at a time: the
text up to each assistant reply (system, user turns, ``<|im_start|>assistant\\n``) is
context (label -100), the reply with its ``<|im_end|>\\n`` is trained on, as
LLaMA-Factory does for Qwen. The images go at the start of the first user turn, as in
``models.vlm.user_message``, so SFT prompts look exactly like the GRPO and eval
prompts. Each ``<|image_pad|>`` is expanded to the number of tokens the image processor
will produce for that image, computed from the image's size without decoding it.

``cutoffLength``: a sample longer than the cutoff is cut at the end of its reply; one
whose images or whose first reply token would fall beyond the cutoff is dropped (cutting
into image tokens breaks the model; a sample with nothing to learn is useless), and
counted. With ``packing``, samples are packed first-fit-decreasing into sequences of at
most ``cutoffLength`` tokens that attend across sample boundaries (LLaMA-Factory's
``packing`` without ``neat_packing``).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..models.vlm import IMAGE_TOKEN, QWEN_VL_CHAT_TEMPLATE, expand_image_tokens, mm_token_types, user_message

IGNORE_INDEX = -100


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class EncodedSample:
    """One training sequence: ``labels[t]`` is ``input_ids[t]`` where it carries loss, else -100."""

    id: str
    input_ids: list[int]
    labels: list[int]
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


def image_token_count(path: str, image_processor) -> int:
    """Tokens one image becomes after the processor's resize and the 2x2 merge."""
    from PIL import Image

    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    with Image.open(path) as img:
        width, height = img.size
    if hasattr(image_processor, "get_number_of_image_patches"):
        patches = image_processor.get_number_of_image_patches(height, width, {})
    else:
        with Image.open(path) as img:
            patches = int(image_processor(images=[img.convert("RGB")], return_tensors="pt")["image_grid_thw"].prod())
    return patches // merge**2


# --- one sample -----------------------------------------------------------------------------


def encode_example(example, tokenizer, image_processor, cutoff_length: int) -> EncodedSample:
    """A ``ColdExample`` as token ids and labels; raises ``SkipSample`` when unusable."""
    counts = [image_token_count(p, image_processor) for p in example.image_paths]
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
    sample = EncodedSample(example.id, input_ids, labels, list(example.image_paths), counts)
    return apply_cutoff(sample, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cutoff_length)


def apply_cutoff(sample: EncodedSample, image_token_id: int, cutoff_length: int) -> EncodedSample:
    """Cut a long sample at ``cutoff_length`` when that keeps its images and some labels."""
    if len(sample) <= cutoff_length:
        return sample
    last_image = max((i for i, t in enumerate(sample.input_ids) if t == image_token_id), default=-1)
    first_label = next((i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX), len(sample))
    # The label at position t is predicted from position t-1: keep at least one pair.
    if last_image >= cutoff_length or first_label >= cutoff_length:
        raise SkipSample("too_long")
    return EncodedSample(sample.id, sample.input_ids[:cutoff_length], sample.labels[:cutoff_length],
                         sample.image_paths, sample.image_tokens, truncated=True)


def encode_all(examples, tokenizer, image_processor, cutoff_length: int) -> tuple[list[EncodedSample], collections.Counter]:
    """Every example encoded; the skipped ones counted by reason (``truncated`` is kept)."""
    samples, counts = [], collections.Counter()
    for example in examples:
        try:
            sample = encode_example(example, tokenizer, image_processor, cutoff_length)
        except SkipSample as skip:
            counts[skip.reason] += 1
            continue
        counts["truncated"] += sample.truncated
        samples.append(sample)
    return samples, counts


# --- packing and batches ----------------------------------------------------------------------


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: groups of indices whose lengths sum to at most ``capacity``.

    Groups are returned in the order of their first (longest) member's index, each
    group's members in index order, so packing is deterministic.
    """
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def epoch_micro_batches(num_groups: int, batch_size: int, epoch: int, seed: int,
                        rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches (lists of group indices) of one epoch.

    A pure function of its arguments, so a resumed stage finds its place from the step
    alone. Every rank gets the same number of groups: the shuffled order is wrapped
    around to a multiple of ``world_size`` (as torch's DistributedSampler does).
    """
    order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    per_rank = math.ceil(num_groups / world_size)
    order = (order * (1 + per_rank * world_size // max(num_groups, 1)))[: per_rank * world_size]
    mine = order[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@dataclass
class Batch:
    """Model inputs of one micro-batch; ``labels`` (B, T) with -100 on padding and context."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    tokens: int  # non-padding tokens
    target_tokens: int  # tokens that carry loss (after the one-position shift)


def load_group(samples: Sequence[EncodedSample], image_processor) -> dict[str, Any]:
    """One sequence from one or more (packed) samples, with its images processed."""
    from ..data.formats import load_rgb

    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    paths = [p for s in samples for p in s.image_paths]
    planned = [n for s in samples for n in s.image_tokens]
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "pixel_values": None, "image_grid_thw": None}
    if paths:
        feats = image_processor(images=[load_rgb(p) for p in paths], return_tensors="pt")
        merge = int(getattr(image_processor, "merge_size", 2) or 2)
        actual = [int(t.prod()) // merge**2 for t in feats["image_grid_thw"]]
        if actual != planned:  # the size-based count and the processor disagree: a bug, not data
            raise RuntimeError(f"image tokens planned {planned} but the processor made {actual} ({paths})")
        out["pixel_values"], out["image_grid_thw"] = feats["pixel_values"], feats["image_grid_thw"]
    return out


def collate(groups: Sequence[dict[str, Any]], pad_token_id: int, image_token_id: int) -> Batch:
    """Right-padded (B, T) tensors; images of the batch concatenated in order."""
    width = max(len(g["input_ids"]) for g in groups)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    for row, g in enumerate(groups):
        n = len(g["input_ids"])
        ids[row, :n] = torch.tensor(g["input_ids"])
        labels[row, :n] = torch.tensor(g["labels"])
        mask[row, :n] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    vision = [g for g in groups if g["pixel_values"] is not None]
    if vision:
        inputs["pixel_values"] = torch.cat([g["pixel_values"] for g in vision])
        inputs["image_grid_thw"] = torch.cat([g["image_grid_thw"] for g in vision])
        inputs["mm_token_type_ids"] = mm_token_types(ids, image_token_id)
    return Batch(inputs, labels, int(mask.sum()), int((labels[:, 1:] != IGNORE_INDEX).sum()))


@dataclass
class TrainingData:
    """Encoded samples, their grouping into sequences, and what was dropped."""

    samples: list[EncodedSample]
    groups: list[list[int]]
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def group(self, index: int) -> list[EncodedSample]:
        return [self.samples[i] for i in self.groups[index]]


def build_training_data(examples, tokenizer, image_processor, cutoff_length: int, packing: bool) -> TrainingData:
    samples, skipped = encode_all(examples, tokenizer, image_processor, cutoff_length)
    groups = pack([len(s) for s in samples], cutoff_length) if packing else [[i] for i in range(len(samples))]
    return TrainingData(samples, groups, skipped)
