"""Training sequences of one GRPO step: prompt + completion rows with their images.

``B`` rows (num_prompts * group_size, prompt-major), ``P`` prompt columns (left-padded),
``T`` completion columns (right-padded). Each row carries its own image patches so a
micro-batch is any subset of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..models.vlm import EncodedPrompts, mm_token_types
from .rollout import Rollout, vision_token_ids
from .sampler import prefix_position_ids, prefix_rope_deltas


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    completion_ids: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T): real completion tokens of rows that may train
    pixel_rows: list[torch.Tensor | None]  # per row: its images' patches, (patches, dim)
    grid_rows: list[torch.Tensor | None]  # per row: (num_images, 3)
    image_token_id: int
    prompts: EncodedPrompts | None = None  # the group's shared prefixes (one row per prompt)
    group_size: int = 1

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_len(self) -> int:
        return self.completion_ids.shape[1]

    def model_inputs(self, rows: Sequence[int], device: str) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward for a subset of rows."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        ids = self.input_ids[idx]
        out = {"input_ids": ids, "attention_mask": self.attention_mask[idx]}
        pixels = [self.pixel_rows[i] for i in rows if self.pixel_rows[i] is not None]
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
            out["image_grid_thw"] = torch.cat([self.grid_rows[i] for i in rows if self.grid_rows[i] is not None])
            out["mm_token_type_ids"] = mm_token_types(ids, self.image_token_id)
        return {k: v.to(device) for k, v in out.items()}


def _per_prompt_vision(prompts: EncodedPrompts, images_per_prompt: Sequence[int]):
    """Split the batch's vision tensors back into one (pixels, grid) pair per prompt."""
    if prompts.pixel_values is None:
        return [(None, None)] * len(images_per_prompt)
    grid = prompts.image_grid_thw
    patches = grid.prod(dim=1).tolist()
    chunks = torch.split(prompts.pixel_values, patches)
    out, image = [], 0
    for count in images_per_prompt:
        if count == 0:
            out.append((None, None))
        else:
            out.append((torch.cat(chunks[image:image + count]), grid[image:image + count]))
        image += count
    return out


def build_policy_batch(
    prompts: EncodedPrompts,
    images_per_prompt: Sequence[int],
    rollout: Rollout,
    group_size: int,
    tokenizer,
    image_token_id: int,
) -> PolicyBatch:
    """Concatenate prompts (repeated per group) with their completions.

    Rows whose completion sampled a vision token are kept in the batch (their group's
    statistics stay whole) but get an all-zero loss mask, and those tokens are replaced
    by padding so the forward pass never sees an unmatched image slot.
    """
    completion = rollout.completion_ids.clone()
    bad = torch.tensor(vision_token_ids(tokenizer), dtype=completion.dtype)
    completion[torch.isin(completion, bad)] = tokenizer.pad_token_id
    prompt_ids = prompts.input_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompts.attention_mask.repeat_interleave(group_size, dim=0)
    loss_mask = rollout.mask * (~rollout.vision_token_rows).long().unsqueeze(1)
    vision = _per_prompt_vision(prompts, images_per_prompt)
    pixel_rows = [vision[r // group_size][0] for r in range(prompt_ids.shape[0])]
    grid_rows = [vision[r // group_size][1] for r in range(prompt_ids.shape[0])]
    return PolicyBatch(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, rollout.mask], dim=1),
        completion_ids=completion,
        loss_mask=loss_mask,
        pixel_rows=pixel_rows,
        grid_rows=grid_rows,
        image_token_id=image_token_id,
        prompts=prompts,
        group_size=group_size,
    )


def sequence_logprobs(
    model,
    batch: PolicyBatch,
    rows: Sequence[int],
    temperature: float,
    device: str,
    with_entropy: bool = False,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the completion tokens of ``rows``: ``(b, T)`` each, float32.

    ``model`` is what runs the forward: one of our engines (the policy, the frozen
    reference) over a ``LogprobModel`` (grpo/logprob_head.py), never a module taken out of
    one. Its head turns hidden states into log-probs ``LOGPROB_CHUNK_TOKENS`` (grpo/algos.py)
    positions at a time, so no ``(b, T, V)`` full-vocabulary logits exist, in forward or in backward
    (at 4 x 8192 tokens and a 152k vocabulary they would be about 20 GB per copy).

    With ``shared_prefix`` each distinct prompt of ``rows`` (and its images) goes through
    the model once and its KV cache is repeated for its rows, as the sampler does:
    gradients flow back through the shared prefix, so the result and its gradient equal
    the plain forward on full sequences (``shared_prefix=False``), at a fraction of the
    prompt's cost when G completions share it. A micro-batch whose rows all have
    different prompts has nothing to share: one plain forward then (two passes would
    only cost a second pass through the model).
    """
    rows = list(rows)
    # Some prompt has two rows here. A function of the row indices and the group size only,
    # which every rank shares (update_policy evens the ranks' rows up in whole groups), so
    # under ZeRO-3 all ranks make the same number of engine calls (each a collective).
    shares = len({r // batch.group_size for r in rows}) < len(rows)
    score = _prefix_shared_scores if shared_prefix and shares and batch.prompts is not None else _full_scores
    logprobs, entropy = score(model, batch, rows, temperature, device)
    return logprobs, entropy if with_entropy else None


def _scores(out) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(logprobs, entropy)`` a scoring forward returns; a plain model's output is refused.

    A Hugging Face forward would accept ``targets`` into its ``**kwargs`` and return
    logits: a clear error rather than a silent full-vocabulary path.
    """
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(
            "sequence_logprobs needs an engine over grpo/logprob_head.py's LogprobModel, whose forward "
            f"scores targets; this model's forward returned {type(out).__name__}"
        )
    return out


def _full_scores(model, batch: PolicyBatch, rows: list[int], temperature: float,
                 device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T) log-probs and entropies: one forward on the full prompt + completion rows.

    The head sees only the last ``T + 1`` positions' hidden states (position t predicts
    completion token t): the prompt's logits are never computed.
    """
    targets = batch.completion_ids[rows].to(device)
    return _scores(model(targets=targets, temperature=temperature, **batch.model_inputs(rows, device)))


def _prefix_shared_scores(model, batch: PolicyBatch, rows: list[int], temperature: float,
                          device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T) log-probs and entropies: each prompt once, its KV cache repeated for its rows,
    then the completions scored on that cache."""
    prompts = batch.prompts
    owners = [r // batch.group_size for r in rows]  # prompt of each row
    distinct = sorted(set(owners))
    where = {p: i for i, p in enumerate(distinct)}
    sub = _select_prompts(prompts, distinct)
    inputs = {k: v.to(device) for k, v in sub.model_inputs(batch.image_token_id).items()}
    # The plain forward (no targets): the cache, and the last prompt position's (p, 1, V) logits.
    prefix = model(**inputs, position_ids=prefix_position_ids(model, inputs), use_cache=True, logits_to_keep=1)
    index = torch.tensor([where[p] for p in owners], device=device)
    cache = prefix.past_key_values
    cache.reorder_cache(index)  # differentiable index_select: gradients reach the prefix
    deltas = prefix_rope_deltas(model, inputs)
    prompt_mask = sub.attention_mask.to(device).index_select(0, index)
    completion = batch.completion_ids[rows].to(device)
    T = completion.shape[1]
    position = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(T, device=device).unsqueeze(0)  # (b, T)
    if deltas is not None:  # M-RoPE: text positions after the images, same on t, h, w
        position = (position + deltas.to(device).index_select(0, index)).unsqueeze(0).expand(3, -1, -1)
    return _scores(model(
        targets=completion,
        temperature=temperature,
        first_logits=prefix.logits[:, -1:, :].index_select(0, index),  # the last prompt token predicts token 0
        input_ids=completion,
        attention_mask=torch.cat([prompt_mask, batch.attention_mask[rows, -T:].to(device)], dim=1),
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
    ))


def _select_prompts(prompts: EncodedPrompts, keep: list[int]) -> EncodedPrompts:
    """The rows ``keep`` of an encoded prompt batch, with their images, trimmed of shared padding."""
    sub = _index_prompts(prompts, keep)
    pad = int((sub.attention_mask.sum(dim=0) == 0).sum())  # columns that are padding in every kept row (left)
    return replace(sub, input_ids=sub.input_ids[:, pad:], attention_mask=sub.attention_mask[:, pad:])


def _index_prompts(prompts: EncodedPrompts, keep: list[int]) -> EncodedPrompts:
    """The rows ``keep`` (repeats allowed) of an encoded prompt batch, with their images."""
    idx = torch.tensor(keep, dtype=torch.long)
    pixels = grid = None
    counts = [len(images) for images in prompts.images] or [0] * prompts.input_ids.shape[0]
    per_prompt = _per_prompt_vision(prompts, counts)
    chosen = [per_prompt[i] for i in keep if per_prompt[i][0] is not None]
    if chosen:
        pixels = torch.cat([c[0] for c in chosen])
        grid = torch.cat([c[1] for c in chosen])
    images = [prompts.images[i] for i in keep] if prompts.images else []
    return EncodedPrompts(prompts.input_ids[idx], prompts.attention_mask[idx], pixels, grid, list(keep),
                          images=images)


def pad_groups(batch: PolicyBatch, advantages: torch.Tensor, groups: int) -> tuple[PolicyBatch, torch.Tensor]:
    """Append ``groups`` copies of the first group that train on nothing (loss mask 0).

    Under ZeRO every forward and backward is a collective, so every rank must run the
    same number of micro-batches; a rank whose prompts were dropped as too long evens
    up with rows that add exactly zero to the loss and its gradient (``aggregation_weight``
    counts only rows with tokens). ``advantages``: ``(B,)`` -> ``(B + groups * G,)``.
    """
    if groups <= 0:
        return batch, advantages
    size, prompts = batch.group_size, batch.prompts
    rows = list(range(batch.rows)) + [r % size for r in range(groups * size)]
    idx = torch.tensor(rows, dtype=torch.long)
    loss_mask = batch.loss_mask[idx].clone()
    loss_mask[batch.rows:] = 0
    if prompts is not None:
        prompts = _index_prompts(prompts, list(range(prompts.input_ids.shape[0])) + [0] * groups)
    padded = replace(batch, input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                     completion_ids=batch.completion_ids[idx], loss_mask=loss_mask,
                     pixel_rows=[batch.pixel_rows[r] for r in rows], grid_rows=[batch.grid_rows[r] for r in rows],
                     prompts=prompts)
    return padded, torch.cat([advantages, advantages.new_zeros(groups * size)])


def select_groups(batch: PolicyBatch, groups: Sequence[int]) -> PolicyBatch:
    """The rows of the groups ``groups`` (prompt indexes, in that order), with their images."""
    size = batch.group_size
    rows = [g * size + j for g in groups for j in range(size)]
    idx = torch.tensor(rows, dtype=torch.long)
    prompts = _index_prompts(batch.prompts, list(groups)) if batch.prompts is not None else None
    return replace(batch, input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                   completion_ids=batch.completion_ids[idx], loss_mask=batch.loss_mask[idx],
                   pixel_rows=[batch.pixel_rows[r] for r in rows], grid_rows=[batch.grid_rows[r] for r in rows],
                   prompts=prompts)


def _pad_columns(t: torch.Tensor, left: int, right: int, value: int) -> torch.Tensor:
    """``(B, L) -> (B, left + L + right)``, new columns filled with ``value``."""
    return torch.nn.functional.pad(t, (left, right), value=value)


def concat_batches(batches: Sequence[PolicyBatch], pad_token_id: int) -> PolicyBatch:
    """One batch of the rows of ``batches`` (rollout rounds of one step, same group size).

    Prompt columns are left-padded to the widest prompt and completion columns
    right-padded to the longest completion (attention and loss mask 0 there), so each
    row's tokens keep their positions relative to its first real token.
    """
    if len(batches) == 1:
        return batches[0]
    P = max(b.input_ids.shape[1] - b.completion_len for b in batches)
    T = max(b.completion_len for b in batches)
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "attn": [], "comp": [], "loss": []}
    for b in batches:
        left, right = P - (b.input_ids.shape[1] - b.completion_len), T - b.completion_len
        parts["ids"].append(_pad_columns(b.input_ids, left, right, pad_token_id))
        parts["attn"].append(_pad_columns(b.attention_mask, left, right, 0))
        parts["comp"].append(_pad_columns(b.completion_ids, 0, right, pad_token_id))
        parts["loss"].append(_pad_columns(b.loss_mask, 0, right, 0))
    prompts = [b.prompts for b in batches]
    merged = None
    if all(p is not None for p in prompts):
        width = max(p.input_ids.shape[1] for p in prompts)
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
        merged = EncodedPrompts(
            torch.cat([_pad_columns(p.input_ids, width - p.input_ids.shape[1], 0, pad_token_id) for p in prompts]),
            torch.cat([_pad_columns(p.attention_mask, width - p.input_ids.shape[1], 0, 0) for p in prompts]),
            torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None,
            [k for p in prompts for k in p.kept], images=[i for p in prompts for i in p.images],
        )
    first = batches[0]
    return replace(first, input_ids=torch.cat(parts["ids"]), attention_mask=torch.cat(parts["attn"]),
                   completion_ids=torch.cat(parts["comp"]), loss_mask=torch.cat(parts["loss"]),
                   pixel_rows=[r for b in batches for r in b.pixel_rows],
                   grid_rows=[r for b in batches for r in b.grid_rows], prompts=merged)


def micro_batches(rows: Sequence[int], size: int) -> list[list[int]]:
    rows = list(rows)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def aggregation_weight(mask: torch.Tensor, micro_rows: Sequence[int], all_rows: Sequence[int], aggregation: str) -> float:
    """The share of a mini-batch's loss that one micro-batch's (locally aggregated) loss carries.

    Accumulating ``weight * micro_loss`` over micro-batches reproduces the mini-batch's
    loss exactly: by rows with tokens for ``sequence_mean``, by tokens for ``token_mean``,
    by rows for ``dr_grpo`` (whose divisor counts every row, each ``mask.shape[1]`` wide).
    """
    micro, full = mask[list(micro_rows)], mask[list(all_rows)]
    if aggregation == "token_mean":
        return float(micro.sum()) / max(float(full.sum()), 1.0)
    if aggregation == "dr_grpo":
        return len(micro_rows) / max(len(all_rows), 1)
    return float((micro.sum(dim=1) > 0).sum()) / max(float((full.sum(dim=1) > 0).sum()), 1.0)
