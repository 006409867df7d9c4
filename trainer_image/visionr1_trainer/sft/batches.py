"""SFT batches: packing, the data order of an epoch, and collated model inputs.

Packing (``sft.packing``) puts several samples in one sequence, first-fit-decreasing up
to ``cutoffLength`` tokens, and keeps them apart as LLaMA-Factory's ``neat_packing``
does: every sample's positions start again at 0 (the M-RoPE positions of its images
included, computed here as the model computes them for a sample alone) and attention
is block-diagonal, so no sample sees another. The model gets the positions as the
(4, B, T) ``position_ids`` transformers' Qwen2.5-VL takes for packed rows (text
positions first, then temporal, height and width) and no ``attention_mask``: from the
restarts in the text positions it builds the block-diagonal causal mask itself
(``masking_utils.find_packed_sequence_indices``), which it does only without a KV cache:
the inputs carry ``use_cache=False``. A packed row's forward pass gives
each sample the logits it gets alone; ``tests/test_sft_packing.py`` checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..models.vlm import mm_token_types
from .data import IGNORE_INDEX, EncodedSample
from .images import ImageBounds, preprocess_image


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


def load_image(path: str, bounds: ImageBounds):
    from ..data.formats import load_rgb

    return preprocess_image(load_rgb(path), bounds)


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grids: Sequence[Sequence[int]],
                    merge: int) -> np.ndarray:
    """(3, T) M-RoPE positions of one sample, as Qwen2.5-VL's ``get_rope_index`` makes them.

    ``input_ids``: (T,); ``grids``: each image's (t, h, w) patch grid, in order. Text
    tokens advance all three rows by one; an image's tokens take (start + t, start + row,
    start + column) over its merged grid, and the text after it starts at
    ``start + max(h, w) // merge``.
    """
    positions = np.zeros((3, len(input_ids)), dtype=np.int64)
    is_image = input_ids == image_token_id
    at, current, image = 0, 0, 0
    while at < len(input_ids):
        if not is_image[at]:
            end = at + (np.argmax(is_image[at:]) if is_image[at:].any() else len(input_ids) - at)
            positions[:, at:end] = np.arange(current, current + end - at)
            current += end - at
            at = end
            continue
        t, h, w = (int(x) for x in grids[image])
        gh, gw = h // merge, w // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        n = t * gh * gw
        positions[:, at:at + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
        current += max(h, w) // merge
        at += n
        image += 1
    return positions


def load_group(samples: Sequence[EncodedSample], image_processor, bounds: ImageBounds = ImageBounds(),
               packed: bool = False, image_token_id: int | None = None) -> dict[str, Any]:
    """One sequence from one or more (packed) samples, with its images processed.

    With ``packed``, ``position_ids`` (4, T) hold each sample's own positions (text, then
    M-RoPE t, h, w), starting at 0 for every sample; ``image_token_id`` is then required.
    """
    ids = np.concatenate([s.input_ids for s in samples])
    labels = np.concatenate([s.labels for s in samples])
    paths = [p for s in samples for p in s.image_paths]
    planned = [n for s in samples for n in s.image_tokens]
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "pixel_values": None, "image_grid_thw": None}
    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    if paths:
        feats = image_processor(images=[load_image(p, bounds) for p in paths], return_tensors="pt")
        actual = [int(t.prod()) // merge**2 for t in feats["image_grid_thw"]]
        if actual != planned:  # the size-based count and the processor disagree: a bug, not data
            raise RuntimeError(f"image tokens planned {planned} but the processor made {actual} ({paths})")
        out["pixel_values"], out["image_grid_thw"] = feats["pixel_values"], feats["image_grid_thw"]
    if packed:
        if image_token_id is None:
            raise ValueError("packed groups need image_token_id for their M-RoPE positions")
        grids = out["image_grid_thw"].tolist() if paths else []
        pieces, used = [], 0
        for s in samples:
            n = len(s.image_tokens)
            rope = mrope_positions(s.input_ids, image_token_id, grids[used:used + n], merge)
            pieces.append(np.concatenate([np.arange(len(s))[None], rope]))
            used += n
        out["position_ids"] = np.concatenate(pieces, axis=1)
    return out


def collate(groups: Sequence[dict[str, Any]], pad_token_id: int, image_token_id: int) -> Batch:
    """Right-padded (B, T) tensors; images of the batch concatenated in order.

    Packed groups (with ``position_ids``) get (4, B, T) positions and no attention mask;
    their padding is a sequence of its own (positions from 0), which no real token sees.
    """
    width = max(len(g["input_ids"]) for g in groups)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    packed = all("position_ids" in g for g in groups)
    positions = torch.zeros((4, len(groups), width), dtype=torch.long) if packed else None
    for row, g in enumerate(groups):
        n = len(g["input_ids"])
        ids[row, :n] = torch.as_tensor(g["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(g["labels"], dtype=torch.long)
        mask[row, :n] = 1
        if packed:
            positions[:, row, :n] = torch.as_tensor(g["position_ids"], dtype=torch.long)
            positions[:, row, n:] = torch.arange(width - n)
    if packed:
        # Without a KV cache: transformers looks for packed rows only when there is none.
        inputs: dict[str, Any] = {"input_ids": ids, "position_ids": positions, "use_cache": False}
    else:
        inputs = {"input_ids": ids, "attention_mask": mask}
    vision = [g for g in groups if g["pixel_values"] is not None]
    if vision:
        inputs["pixel_values"] = torch.cat([g["pixel_values"] for g in vision])
        inputs["image_grid_thw"] = torch.cat([g["image_grid_thw"] for g in vision])
        inputs["mm_token_type_ids"] = mm_token_types(ids, image_token_id)
    return Batch(inputs, labels, int(mask.sum()), int((labels[:, 1:] != IGNORE_INDEX).sum()))
