"""One PTST stage: GRPO on the RL set within this stage's length budget.

``python -m visionr1_trainer grpo --config stage.json`` runs ``run(config)``. Read
``grpo_step`` top to bottom for one step: sample a batch of prompts, roll out
``numGenerations`` completions each within ``maxCompletionLength`` tokens (the PTST
budget), score them with the Hard Format Result Reward, normalise rewards within each
group, and take clipped policy-gradient steps with a KL penalty to the frozen reference.

The stage starts from the previous stage's committed model (``init_uri``: the SFT output
for PTST stage 1, PTST stage k-1 for stage k), commits a resumable checkpoint every
``saveEverySteps`` steps, resumes from the newest one after a kill (step, optimizer and
RNG restored), and commits its final model as the artifact ``model``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointManager, load_trainer_state, resolve_model_dir
from ..config import GRPOStageConfig
from ..distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    broadcast_parameters,
    parameter_fingerprint,
    run_on_ranks,
    verify_replicas_identical,
)
from ..metrics import METRICS_LOG, StageMetrics
from ..models.loading import load_vlm
from ..models.vlm import IMAGE_TOKEN, encode_prompts
from ..runtime import StageStopped, stop_requested
from .algos import group_advantages, masked_mean, policy_loss
from .batch import aggregation_weight, build_policy_batch, micro_batches, sequence_logprobs
from .engine import make_engine
from .reward import batch_rewards
from .rollout import RolloutBackend, SamplingSettings, make_rollout

log = logging.getLogger("visionr1.grpo")


@dataclass
class GRPOState:
    """Everything a step needs, built once per stage."""

    config: GRPOStageConfig
    env: DistEnv
    engine: Any  # TorchEngine or DeepSpeedEngine (engine.py)
    reference: Any | None
    tokenizer: Any
    image_processor: Any
    rollout: RolloutBackend
    examples: list
    image_token_id: int
    history: list[dict] = field(default_factory=list)


# --- data order: a pure function of (seed, step), so a resumed run sees the same batches ---


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the prompts of global ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), num_examples - offset)
        out.extend(perm[offset:offset + take].tolist())
    return out


def rank_share(indices: list[int], env: DistEnv) -> list[int]:
    """This rank's prompts of a global batch (round robin: every rank gets whole groups)."""
    return indices[env.rank::env.world_size]


# --- one step -----------------------------------------------------------------------------


def grpo_step(state: GRPOState, step: int) -> dict[str, float]:
    """Roll out, score, and update once. Returns this step's metrics (mean over ranks)."""
    grpo, ptst = state.config.grpo, state.config.ptst
    group = ptst.num_generations
    started = time.perf_counter()

    # 1. This step's prompts (this rank's share), encoded with their images.
    chosen = rank_share(batch_indices(step, len(state.examples), grpo.rollout_batch_size, grpo.seed), state.env)
    examples = [state.examples[i] for i in chosen]
    images = [ex.load_images() for ex in examples]
    prompts = encode_prompts(
        state.tokenizer, state.image_processor, [ex.problem for ex in examples], images, grpo.max_prompt_length
    )
    examples = [examples[i] for i in prompts.kept]
    images_per_prompt = [len(images[i]) for i in prompts.kept]
    if not examples:
        raise RuntimeError(
            f"step {step}: every prompt is longer than maxPromptLength={grpo.max_prompt_length} tokens"
        )

    # 2. Rollout within the PTST budget.
    sampling = SamplingSettings(group, ptst.max_completion_length, grpo.temperature, grpo.top_p)
    rollout = state.rollout.generate(prompts, images_per_prompt, sampling)

    # 3. HFRRF rewards (1 only if format and answer are both right), group advantages.
    texts = decode_completions(state.tokenizer, rollout.completion_ids, rollout.mask)
    truths = [ex.answer for ex in examples for _ in range(group)]
    scored = batch_rewards(texts, truths)
    rewards = torch.tensor([r.reward for r in scored], dtype=torch.float32)
    rewards[rollout.vision_token_rows] = 0.0
    advantages = group_advantages(rewards, group)

    # 4. Policy update(s) on the rollout batch.
    batch = build_policy_batch(prompts, images_per_prompt, rollout, group, state.tokenizer, state.image_token_id)
    train = update_policy(state, batch, advantages)

    rollout_seconds = rollout.seconds
    stats = {
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        "format_rate": torch.tensor([r.format_ok for r in scored], dtype=torch.float32).mean(),
        "accuracy": torch.tensor([r.answer_ok for r in scored], dtype=torch.float32).mean(),
        "zero_std_groups": (rewards.view(-1, group).std(dim=1) == 0).float().mean(),
        "completion_length_mean": rollout.lengths.float().mean(),
        "completion_length_max": rollout.lengths.float().max(),
        "completion_length_min": rollout.lengths.float().min(),
        "clipped_ratio": rollout.truncated.float().mean(),
        "vision_token_rows": rollout.vision_token_rows.float().sum(),
        "prompts_dropped": torch.tensor(float(len(prompts.dropped_too_long))),
        "reward_timeouts": torch.tensor(float(sum(r.timed_out for r in scored))),
        "rollout_tokens_per_s": torch.tensor(rollout.tokens_generated / max(rollout_seconds, 1e-9)),
        **train,
    }
    stats = {k: float(all_reduce_mean(torch.as_tensor(v, dtype=torch.float32), state.env)) for k, v in stats.items()}
    stats["step_seconds"] = time.perf_counter() - started
    stats["learning_rate"] = grpo.learning_rate
    return stats


def update_policy(state: GRPOState, batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """``updatesPerBatch`` passes of clipped policy-gradient steps over mini-batches."""
    grpo, device = state.config.grpo, state.env.device
    group = state.config.ptst.num_generations
    rows = list(range(batch.rows))
    mini_rows = (grpo.mini_batch_size or grpo.rollout_batch_size) * group // state.env.world_size
    minis = micro_batches(rows, max(mini_rows, group))
    # Old log-probs are needed only when the policy moves before a row is trained on
    # (several mini-batches or passes); otherwise they equal the detached current ones.
    reuse = grpo.updates_per_batch > 1 or len(minis) > 1
    old = frozen_logprobs(state.engine.module, batch, rows, grpo, device) if reuse else None
    ref = frozen_logprobs(state.reference, batch, rows, grpo, device) if state.reference is not None else None
    totals: dict[str, list[torch.Tensor]] = {}
    train_tokens, started = int(batch.loss_mask.sum()) * grpo.updates_per_batch, time.perf_counter()
    for _ in range(grpo.updates_per_batch):
        for mini in minis:
            for key, value in train_minibatch(state, batch, mini, advantages, old, ref).items():
                totals.setdefault(key, []).append(value)
    out = {k: torch.stack(v).mean() for k, v in totals.items()}
    out["train_tokens_per_s"] = torch.tensor(train_tokens / max(time.perf_counter() - started, 1e-9))
    return out


@torch.no_grad()
def frozen_logprobs(model, batch, rows, grpo, device) -> torch.Tensor:
    """(B, T) log-probs under a model that does not change during the update."""
    parts = [sequence_logprobs(model, batch, micro, grpo.temperature, device)[0].cpu()
             for micro in micro_batches(rows, grpo.micro_batch_size)]
    return torch.cat(parts)


def train_minibatch(state: GRPOState, batch, mini: list[int], advantages, old, ref) -> dict[str, torch.Tensor]:
    """Accumulate gradients over micro-batches, average over ranks, clip, step."""
    grpo, device, engine = state.config.grpo, state.env.device, state.engine
    engine.zero_grad()
    acc: dict[str, torch.Tensor] = {}
    for micro in micro_batches(mini, grpo.micro_batch_size):
        logprobs, entropy = sequence_logprobs(engine.module, batch, micro, grpo.temperature, device, with_entropy=True)
        mask = batch.loss_mask[micro].to(device)
        loss, stats = policy_loss(
            logprobs,
            old[micro].to(device) if old is not None else logprobs.detach(),
            ref[micro].to(device) if ref is not None else None,
            advantages[micro].to(device),
            mask,
            epsilon_low=grpo.epsilon_low,
            epsilon_high=grpo.epsilon_high,
            beta=grpo.beta if ref is not None else 0.0,
            aggregation=grpo.loss_aggregation,
        )
        weight = aggregation_weight(batch.loss_mask, micro, mini, grpo.loss_aggregation)
        engine.backward(loss * weight)
        stats = {**stats, "loss": loss.detach(), "entropy": masked_mean(entropy, mask)}
        for key, value in stats.items():
            acc[key] = acc.get(key, torch.tensor(0.0)) + value.detach().cpu() * weight
    acc["grad_norm"] = engine.step()
    state.rollout.sync_weights(engine)
    return acc


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion texts without padding and end-of-turn tokens (format tags are kept)."""
    return [tokenizer.decode(row[: int(n)], skip_special_tokens=True) for row, n in zip(completion_ids, mask.sum(dim=1))]


# --- the stage ------------------------------------------------------------------------------


def load_models(config: GRPOStageConfig, env: DistEnv, work: Path, weights_dir: Path | None = None):
    """The policy (from ``weights_dir``, a checkpoint, else the stage's starting model) and a
    frozen copy of the starting model as the KL reference.

    The reference is the stage's starting point on every attempt, also after a resume.
    """
    source = resolve_model_dir(config.init_uri or config.model.name, config.storage, work)
    policy, tokenizer, image_processor = load_vlm(
        str(weights_dir) if weights_dir else source, config.model.dtype, config.model.attn_implementation,
        env.device, config.model.processor or source,
    )
    policy.train()
    reference = None
    if config.grpo.beta > 0:
        reference, _, _ = load_vlm(source, config.model.dtype, config.model.attn_implementation, env.device)
        reference.eval().requires_grad_(False)
    return source, policy, reference, tokenizer, image_processor


def run(config: GRPOStageConfig) -> dict[str, Any]:
    return run_on_ranks(config, train_stage)


def train_stage(config: GRPOStageConfig, env: DistEnv, work: Path, metrics: StageMetrics) -> dict[str, Any]:
    from ..data.formats import read_rl

    grpo, total = config.grpo, config.ptst.steps
    torch.manual_seed(grpo.seed + env.rank)
    ckpt = CheckpointManager(config.output_uri, config.storage, work)
    found = ckpt.restore_dir()  # resume: weights load before the engine partitions them
    source, policy, reference, tokenizer, image_processor = load_models(
        config, env, work, found[1] / "model" if found else None
    )
    data = read_rl(config.data, config.storage)
    if not data.items:
        raise RuntimeError(f"{config.data.source}: no usable RL rows (skipped: {dict(data.skipped)})")
    engine = make_engine(policy, env, grpo.learning_rate, grpo.deepspeed_zero_stage, _precision(config),
                         grpo.micro_batch_size, grpo.max_grad_norm)
    start = load_trainer_state(found[1], engine.checkpointable_optimizer)[0] if found else 0
    if found is None:
        broadcast_parameters(engine.module, env)
    metrics.rewind(start, found[1] / METRICS_LOG if found else None)
    state = GRPOState(
        config, env, engine, reference, tokenizer, image_processor,
        make_rollout(grpo.rollout_backend, engine.module, tokenizer, env, config), data.items,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    metrics.set(total_steps=total)
    metrics.event("start", step=start, init=source, examples=len(data.items),
                  skipped=dict(data.skipped), resumed=found is not None, attempt=config.attempt)
    log.info("PTST stage %d/%d: %d x %d, steps %d..%d, from %s", config.ptst_index, config.ptst_total,
             config.ptst.max_completion_length, config.ptst.num_generations, start, total, source)
    for step in range(start, total):
        if stop_requested():
            save_checkpoint(state, ckpt, metrics, step)
            raise StageStopped(stage_summary(state, step, total, None))
        stats = grpo_step(state, step)
        state.history.append(stats)
        if env.is_main:
            metrics.log(step + 1, stats)
            log.info("step %d/%d reward %.3f len %.1f kl %.4f", step + 1, total, stats["reward_mean"],
                     stats["completion_length_mean"], stats["kl"])
        if (step + 1) % grpo.save_every_steps == 0 and step + 1 < total:
            save_checkpoint(state, ckpt, metrics, step + 1)
    verify_replicas_identical(engine.module, env)
    metrics.event("replicas", world_size=env.world_size, identical=True,
                  fingerprint=float(parameter_fingerprint(engine.module).sum()))
    save_checkpoint(state, ckpt, metrics, total)
    weights = engine.full_state_dict()  # collective under ZeRO-3: every rank takes part
    uri = None
    if env.is_main:
        uri = ckpt.commit_model(engine.module, tokenizer, image_processor,
                                {"stage": config.stage, "step": total}, state_dict=weights)
    barrier(env)
    summary = stage_summary(state, total, total, uri)
    if env.is_main:
        ckpt.store.put_json("summary.json", summary)
    return summary


def _precision(config: GRPOStageConfig) -> str:
    return {"bfloat16": "bf16", "float16": "fp16"}.get(config.model.dtype, "fp32")


def save_checkpoint(state: GRPOState, ckpt: CheckpointManager, metrics: StageMetrics, step: int) -> None:
    """Commit the training state and the metrics log so far (rank 0 writes; all ranks wait)."""
    weights = state.engine.full_state_dict()  # collective under ZeRO-3
    if state.env.is_main:
        files = {METRICS_LOG: metrics.jsonl_path} if metrics.jsonl_path else {}
        uri = ckpt.save(step, state.engine.module, state.engine.checkpointable_optimizer,
                        extra_files=files, state_dict=weights)
        metrics.event("checkpoint", step=step, uri=uri)
    barrier(state.env)


def stage_summary(state: GRPOState, step: int, total: int, uri: str | None) -> dict[str, Any]:
    """The compact exit summary: last step and the mean of the last few steps' metrics."""
    recent = state.history[-5:]

    def mean(key: str) -> float | None:
        values = [h[key] for h in recent if key in h and not math.isnan(h[key])]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "step": step,
        "totalSteps": total,
        "reward": mean("reward_mean"),
        "accuracy": mean("accuracy"),
        "formatRate": mean("format_rate"),
        "completionLengthMean": mean("completion_length_mean"),
        "clippedRatio": mean("clipped_ratio"),
        "artifactUri": uri,
    }
