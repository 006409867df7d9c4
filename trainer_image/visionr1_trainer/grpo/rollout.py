"""Rollouts: sample ``numGenerations`` completions per prompt, within the PTST length budget.

One interface, two backends:
- ``HFRollout``: a transformers model with a KV cache shared by each prompt's group
  (``sampler.py``), CPU or GPU, on the policy being trained itself, so its weights are
  always current. It samples inside ``engine.gathered_for_generation()``: under ZeRO-3
  the weights are gathered once per rollout and the per-token forwards are local, so
  ranks that stop at different lengths never wait on each other.
- ``VLLMRollout`` (``vllm_rollout.py``): a colocated vLLM engine on the stage's GPUs whose
  weights are refreshed from the policy after every optimizer step.

Both return a ``Rollout``: completion token ids right-padded, the real-token mask, the
length of each completion, and whether the length cap truncated it (no EOS in budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.vlm import EncodedPrompts
from .algos import completion_mask
from .sampler import generate_groups

# Tokens that must never appear in a completion: the model would count them as image
# slots on the training forward pass and fail with "image features and image tokens do
# not match". Suppressed at sampling time and, should one slip through (vLLM, a
# different tokenizer), masked out of the loss and counted.
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class SamplingSettings:
    num_generations: int
    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Rollout:
    """Completions for a batch of prompts, ``B = num_prompts * num_generations`` rows.

    ``completion_ids``: (B, T) right-padded; ``mask``: (B, T) 1 on real tokens (up to
    and including EOS); ``lengths``: (B,); ``truncated``: (B,) bool, the cap was hit.
    ``vision_token_rows``: (B,) bool, a vision token was sampled (row is excluded).
    """

    completion_ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    vision_token_rows: torch.Tensor
    tokens_generated: int
    seconds: float


class RolloutBackend(Protocol):
    def generate(self, prompts: EncodedPrompts, images_per_prompt: list[int], sampling: SamplingSettings,
                 step: int | None = None) -> Rollout: ...

    def sync_weights(self, engine) -> None:
        """Make the sampler's weights equal the policy's (after an optimizer step)."""


def vision_token_ids(tokenizer) -> list[int]:
    ids = []
    for token in VISION_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.append(tid)
    return ids


def finish_rollout(completion_ids: torch.Tensor, tokenizer, max_len: int, seconds: float) -> Rollout:
    """Masks, lengths and truncation flags for raw completion ids (B, T)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    mask = completion_mask(completion_ids, eos, pad)
    has_eos = ((completion_ids == eos) & mask.bool()).any(dim=1)
    lengths = mask.sum(dim=1)
    bad = torch.tensor(vision_token_ids(tokenizer), dtype=completion_ids.dtype)
    vision_rows = (torch.isin(completion_ids, bad) & mask.bool()).any(dim=1)
    # Padding after EOS is whatever generate produced; make it the pad id everywhere.
    completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad))
    return Rollout(
        completion_ids=completion_ids,
        mask=mask,
        lengths=lengths,
        truncated=~has_eos & (lengths >= max_len),
        vision_token_rows=vision_rows,
        tokens_generated=int(lengths.sum()),
        seconds=seconds,
    )


class HFRollout:
    """Sampling with the policy itself (transformers model, no weight sync needed).

    Uses ``generate_groups``: each prompt and its images are encoded once and the KV
    cache is shared by the group, where ``generate`` would encode every copy.
    """

    def __init__(self, engine, tokenizer, image_token_id: int | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.suppress = vision_token_ids(tokenizer)
        self.image_token_id = image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(
            "<|image_pad|>"
        )

    def generate(self, prompts: EncodedPrompts, images_per_prompt: list[int], sampling: SamplingSettings,
                 step: int | None = None) -> Rollout:
        """``step`` is unused: sampling draws from this rank's torch RNG, restored on resume."""
        with self.engine.gathered_for_generation() as model:  # eval mode; ZeRO-3: gathered once
            ids, _, seconds = generate_groups(
                model, prompts, sampling.num_generations, sampling.max_completion_length,
                sampling.temperature, sampling.top_p, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                self.image_token_id, self.suppress,
            )
        return finish_rollout(ids, self.tokenizer, sampling.max_completion_length, seconds)

    def sync_weights(self, engine) -> None:
        return None  # samples from the trained module itself


ROLLOUT_BACKENDS = ("hf", "vllm")


def make_rollout(name: str, engine, tokenizer, env, config) -> RolloutBackend:
    """The rollout backend a stage config names, sampling from ``engine``'s policy."""
    if name == "hf":
        return HFRollout(engine, tokenizer)
    if name == "vllm":
        if not env.device.startswith("cuda"):
            raise RuntimeError("rolloutBackend 'vllm' needs a CUDA GPU; use 'hf' on CPU")
        from .vllm_rollout import VLLMRollout

        return VLLMRollout(engine, tokenizer, env, config)
    raise ValueError(f"unknown rollout backend {name!r}; valid: {', '.join(ROLLOUT_BACKENDS)}")
