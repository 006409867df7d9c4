"""The training batch of one GRPO step: rollout rounds, rewards and their shaping.

``collect_batch`` rolls out this step's prompts (round 0), scores them with the Hard
Format Result Reward, shapes the rewards (DAPO's soft overlong penalty, when set) and,
with ``dynamicSampling``, drops the groups whose rewards are all equal and rolls out
fresh prompts for them, up to ``dynamicSamplingMaxRounds`` extra rounds (DAPO, arXiv
2503.14476, sec. 3.2). The step's reward metrics describe round 0 (the step's own
prompts, as without dynamic sampling); ``dynamic_*`` metrics count what was dropped and
rolled out on top.

Every rank runs the same number of rounds, each of the same number of prompts (the
most any rank still needs): a rollout under ZeRO-3 or a tensor-parallel vLLM group is a
collective, and a rank that skipped one would leave the others waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import all_reduce_max
from ..models.vlm import encode_prompts
from .algos import dynamic_sampling_keep, group_length_penalty, mask_truncated, soft_overlong_penalty
from .batch import PolicyBatch, build_policy_batch, concat_batches, select_groups
from .reward import RewardResult, batch_rewards
from .reward_plugins import RewardScorer
from .rollout import Rollout, SamplingSettings

# The default reward alone (a state built without a scorer: the benchmark's).
HFRRF_ONLY = RewardScorer([("hfrrf", 1.0, "grpo.reward")], timeout_s=1.0)

# Seeds of the extra rounds' prompt streams: far from the step's own stream (seed).
_ROUND_SEED_STRIDE = 1_000_003


@dataclass
class Round:
    """One rollout of a set of prompts: what it sampled and what it scored."""

    examples: list
    prompts: Any  # EncodedPrompts
    rollout: Rollout
    scored: list[RewardResult]
    rewards: torch.Tensor  # (B,) shaped rewards (what the advantages are computed from)
    batch: PolicyBatch
    plugin_stats: dict[str, float]  # plug-in rewards' error and timeout counts


@dataclass
class StepBatch:
    first: Round  # round 0: this step's own prompts (the reward metrics describe it)
    batch: PolicyBatch  # the rows that train (kept groups of every round)
    rewards: torch.Tensor  # (B,) their rewards
    stats: dict[str, torch.Tensor]


def shaped_rewards(rewards: torch.Tensor, scored: list[RewardResult], rollout: Rollout, grpo,
                   max_completion_length: int, group_size: int) -> torch.Tensor:
    """(B,) rewards as trained on: ``rewards`` (the reward terms' sum), 0 for rows that
    sampled a vision token, times the length penalty on correct completions (HFRRF's
    verdict), plus the soft overlong penalty."""
    rewards = rewards.clone()
    rewards[rollout.vision_token_rows] = 0.0
    if grpo.length_penalty > 0:
        correct = torch.tensor([r.reward > 0 for r in scored]) & ~rollout.vision_token_rows
        rewards = rewards * group_length_penalty(rollout.lengths, correct, group_size, grpo.length_penalty)
    if grpo.overlong == "softPenalty":
        rewards = rewards + soft_overlong_penalty(rollout.lengths, max_completion_length, grpo.overlong_buffer,
                                                  grpo.overlong_penalty_factor)
    return rewards


def rollout_round(state, examples: list, step: int) -> Round | None:
    """Encode, roll out and score ``examples``; None when every prompt was too long."""
    grpo, ptst = state.config.grpo, state.config.ptst
    group = ptst.num_generations
    images = [ex.load_images() for ex in examples]
    prompts = encode_prompts(
        state.tokenizer, state.image_processor, [ex.problem for ex in examples], images, grpo.max_prompt_length
    )
    examples = [examples[i] for i in prompts.kept]
    images_per_prompt = [len(images[i]) for i in prompts.kept]
    if not examples:
        return None
    sampling = SamplingSettings(group, ptst.max_completion_length, grpo.temperature, grpo.top_p)
    rollout = state.rollout.generate(prompts, images_per_prompt, sampling, step=step)
    texts = decode_completions(state.tokenizer, rollout.completion_ids, rollout.mask)
    truths = [ex.answer for ex in examples for _ in range(group)]
    scored = batch_rewards(texts, truths)  # HFRRF: the default reward, and the accuracy metrics
    problems = [ex.problem for ex in examples for _ in range(group)]
    scorer = state.scorer or HFRRF_ONLY
    summed, plugin_stats = scorer(scored, texts, truths, problems)
    rewards = shaped_rewards(summed, scored, rollout, grpo, ptst.max_completion_length, group)
    batch = build_policy_batch(prompts, images_per_prompt, rollout, group, state.tokenizer, state.image_token_id)
    if grpo.overlong == "mask":
        batch.loss_mask = mask_truncated(batch.loss_mask, rollout.truncated)
    return Round(examples, prompts, rollout, scored, rewards, batch, plugin_stats)


def collect_batch(state, step: int, chosen: list[int], extra_indices) -> StepBatch:
    """This step's training rows: round 0 on ``chosen``, then (dynamic sampling) refills.

    ``extra_indices(round, count)`` gives this rank's ``count`` fresh example indices of
    extra round ``round`` (1-based), a pure function of (seed, step, round).
    """
    grpo, group = state.config.grpo, state.config.ptst.num_generations
    first = rollout_round(state, [state.examples[i] for i in chosen], step)
    if first is None:
        raise RuntimeError(f"step {step}: every prompt is longer than maxPromptLength={grpo.max_prompt_length} tokens")
    if not grpo.dynamic_sampling:
        return StepBatch(first, first.batch, first.rewards, {k: torch.tensor(v) for k, v in first.plugin_stats.items()})
    target = len(chosen)  # groups this rank trains on when nothing is dropped
    keep = dynamic_sampling_keep(first.rewards, group)
    parts, rewards = [_kept(first, keep, target)], [_kept_rewards(first, keep, target, group)]
    kept, dropped, extra_prompts, rounds = int(keep.sum().clamp(max=target)), int((~keep).sum()), 0, 0
    while rounds < grpo.dynamic_sampling_max_rounds:
        need = all_reduce_max(target - kept, state.env)  # the same on every rank
        if need <= 0:
            break
        rounds += 1
        more = rollout_round(state, [state.examples[i] for i in extra_indices(rounds, need)], step)
        extra_prompts += need
        if more is None:
            continue
        keep = dynamic_sampling_keep(more.rewards, group)
        dropped += int((~keep).sum())
        take = max(target - kept, 0)
        parts.append(_kept(more, keep, take))
        rewards.append(_kept_rewards(more, keep, take, group))
        kept += min(int(keep.sum()), take)
    stats = {"dynamic_dropped_groups": dropped, "dynamic_extra_prompts": extra_prompts,
             "dynamic_extra_rounds": rounds, "dynamic_kept_groups": kept, **first.plugin_stats}
    batch = concat_batches([p for p in parts if p.rows], state.tokenizer.pad_token_id) if kept else None
    reward = torch.cat(rewards) if kept else None
    if batch is None:
        # No group on this rank carries signal: it trains on its first group with a zero
        # loss mask, so it still runs every collective of the update and adds nothing.
        batch = select_groups(first.batch, [0])
        batch.loss_mask = torch.zeros_like(batch.loss_mask)
        reward = first.rewards[:group].clone()
    return StepBatch(first, batch, reward, {k: torch.tensor(float(v)) for k, v in stats.items()})


def _kept_groups(keep: torch.Tensor, limit: int) -> list[int]:
    return keep.nonzero().flatten().tolist()[:limit]


def _kept(part: Round, keep: torch.Tensor, limit: int) -> PolicyBatch:
    return select_groups(part.batch, _kept_groups(keep, limit))


def _kept_rewards(part: Round, keep: torch.Tensor, limit: int, group: int) -> torch.Tensor:
    groups = _kept_groups(keep, limit)
    if not groups:
        return part.rewards[:0]
    return part.rewards.view(-1, group)[groups].reshape(-1)


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion texts without padding and end-of-turn tokens (format tags are kept)."""
    return [tokenizer.decode(row[: int(n)], skip_special_tokens=True) for row, n in zip(completion_ids, mask.sum(dim=1))]
