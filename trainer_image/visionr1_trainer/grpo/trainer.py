"""One PTST stage: GRPO on the RL set within this stage's length budget.

``python -m visionr1_trainer grpo --config stage.json`` runs ``run(config)``. Read
``grpo_step`` top to bottom for one step: sample a batch of prompts, roll out
``numGenerations`` completions each within ``maxCompletionLength`` tokens (the PTST
budget), score them with the Hard Format Result Reward, normalise rewards within each
group, and take clipped policy-gradient steps with a KL penalty to the frozen reference.

The stage starts from the previous stage's committed model (``init_uri``: the SFT output
for PTST stage 1, PTST stage k-1 for stage k), commits a resumable checkpoint every
``saveEverySteps`` steps, resumes from the newest one after a kill (step, optimizer
state, each rank's RNG restored), and commits its final model as the artifact ``model``.
Every forward pass goes through the engine (``engine.py``): torch, or DeepSpeed ZeRO 1-3.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointManager, resolve_model_dir
from ..config import GRPOStageConfig, activation_checkpointing_on
from ..distributed import DistEnv, all_reduce_max, all_reduce_mean, barrier, run_on_ranks
from ..metrics import METRICS_LOG, StageMetrics
from ..models.loading import load_model, load_model_config, load_processor_parts, torch_dtype
from ..models.lora import adapt_for_stage
from ..models.vlm import IMAGE_TOKEN
from ..runtime import StageStopped, UnusableSetting, stop_requested
from .algos import curriculum_slice, group_advantages, kl_k3, masked_mean, policy_loss
from .batch import aggregation_weight, micro_batches, pad_groups, sequence_logprobs
from .collect import collect_batch, decode_completions  # noqa: F401  (decode_completions: the bench uses it)
from .engine import EngineSpec, make_engine, make_reference
from .logprob_head import LogprobModel
from .reward_plugins import RewardScorer
from .rollout import RolloutBackend, make_rollout
from .validation import due as validation_due
from .validation import load_validation_items, validate

log = logging.getLogger("visionr1.grpo")


@dataclass
class GRPOState:
    """Everything a step needs, built once per stage."""

    config: GRPOStageConfig
    env: DistEnv
    engine: Any  # TorchEngine or DeepSpeedEngine (engine.py)
    reference: Any | None  # FrozenModel (engine.py)
    tokenizer: Any
    image_processor: Any
    rollout: RolloutBackend
    examples: list
    image_token_id: int
    scorer: Any = None  # RewardScorer (grpo/reward_plugins.py)
    cold_start: Any | None = None  # FrozenModel of the cold-start model (the reference itself when it is one)
    history: list[dict] = field(default_factory=list)
    validation_items: list = field(default_factory=list)  # grpo.validation's held-out items (grpo/validation.py)


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


def ptst_learning_rate(step: int, peak: float, warmup_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of a PTST stage: a linear warmup over
    ``warmup_steps`` (step s at (s + 1) / warmup_steps of the peak, so no rollout is
    wasted on a zero rate), then the paper's constant rate. A function of the step only:
    a resumed stage continues the same schedule."""
    if warmup_steps <= 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup_steps)


# --- one step -----------------------------------------------------------------------------


def extra_batch_indices(step: int, round_: int, count: int, num_examples: int, seed: int, env: DistEnv) -> list[int]:
    """This rank's ``count`` fresh prompts of dynamic sampling's extra round ``round_`` of
    ``step``: a pure function of (seed, step, round), so a resumed run draws the same ones.
    Each round reads its own permutation stream, apart from the steps' own."""
    stream = batch_indices(step, num_examples, count * env.world_size, seed + 1_000_003 * round_)
    return rank_share(stream, env)


def grpo_step(state: GRPOState, step: int) -> dict[str, float]:
    """Roll out, score, and update once. Returns this step's metrics (mean over ranks)."""
    grpo, ptst = state.config.grpo, state.config.ptst
    group = ptst.num_generations
    started = time.perf_counter()
    lr = ptst_learning_rate(step, grpo.learning_rate, grpo.warmup_steps)
    state.engine.set_lr(lr)

    # 1-3. This step's prompts (this rank's share) rolled out within the PTST budget and
    # scored (HFRRF: 1 only if format and answer are both right; grpo/collect.py), with
    # dynamic sampling's refills when it is on.
    chosen = rank_share(batch_indices(step, len(state.examples), grpo.rollout_batch_size, grpo.seed), state.env)
    collected = collect_batch(state, step, chosen, lambda round_, count: extra_batch_indices(
        step, round_, count, len(state.examples), grpo.seed, state.env))
    first = collected.first
    rollout, scored, rewards = first.rollout, first.scored, first.rewards
    advantages = group_advantages(collected.rewards, group, scale=grpo.advantage_scale)

    # 4. Policy update(s) on the rollout batch.
    train = update_policy(state, collected.batch, advantages)

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
        "prompts_dropped": torch.tensor(float(len(first.prompts.dropped_too_long))),
        "reward_timeouts": torch.tensor(float(sum(r.timed_out for r in scored))),
        "rollout_tokens_per_s": torch.tensor(rollout.tokens_generated / max(rollout_seconds, 1e-9)),
        **train,
    }
    # Counts summed over ranks (the mean over ranks times their number).
    stats.update({k: v * state.env.world_size for k, v in collected.stats.items()})
    stats = mean_over_ranks(stats, state.env)
    stats["step_seconds"] = time.perf_counter() - started
    stats["learning_rate"] = lr
    return stats


def mean_over_ranks(stats: dict[str, Any], env: DistEnv) -> dict[str, float]:
    """Each scalar's mean over ranks, all in one all-reduce (one a key was 25 collectives a
    step). Every rank builds the same keys in the same order (the same code path)."""
    keys = list(stats)
    values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
    return dict(zip(keys, all_reduce_mean(values, env).tolist()))


def update_policy(state: GRPOState, batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """``updatesPerBatch`` passes of clipped policy-gradient steps over mini-batches."""
    grpo, device = state.config.grpo, state.env.device
    group = state.config.ptst.num_generations
    # Every rank runs the same micro-batches (each a collective under ZeRO): a rank that
    # dropped too-long prompts evens up with rows that train on nothing.
    batch, advantages = pad_groups(batch, advantages, (all_reduce_max(batch.rows, state.env) - batch.rows) // group)
    rows = list(range(batch.rows))
    mini_rows = (grpo.mini_batch_size or grpo.rollout_batch_size) * group // state.env.world_size
    minis = micro_batches(rows, max(mini_rows, group))
    # Old log-probs are needed only when the policy moves before a row is trained on
    # (several mini-batches or passes); otherwise they equal the detached current ones.
    reuse = grpo.updates_per_batch > 1 or len(minis) > 1
    shared = shared_prefix_on(grpo.shared_prefix, state.engine.spec)
    old = frozen_logprobs(state.engine, batch, rows, grpo, device, shared) if reuse else None
    ref = frozen_logprobs(state.reference, batch, rows, grpo, device, shared) if state.reference is not None else None
    cold = None  # None: kl_cold_start is the KL term itself (the reference is the cold-start model)
    if state.cold_start is not None and state.cold_start is not state.reference:
        cold = frozen_logprobs(state.cold_start, batch, rows, grpo, device, shared)
    totals: dict[str, list[torch.Tensor]] = {}
    train_tokens, started = int(batch.loss_mask.sum()) * grpo.updates_per_batch, time.perf_counter()
    for _ in range(grpo.updates_per_batch):
        for mini in minis:
            for key, value in train_minibatch(state, batch, mini, advantages, old, ref, shared, cold).items():
                totals.setdefault(key, []).append(value)
    out = {k: torch.stack(v).mean() for k, v in totals.items()}
    out["train_tokens_per_s"] = torch.tensor(train_tokens / max(time.perf_counter() - started, 1e-9))
    return out


def shared_prefix_on(setting: str, spec: EngineSpec) -> bool:
    """Whether scoring passes each prompt once for its group's rows (``grpo.sharedPrefix``).

    ``auto``: on, but off under ZeRO-3, where DeepSpeed gathers every layer for each pass
    through the model and releases it after: the prompt's own pass would double the
    gathers of every scoring forward and its backward, on the reference too (measured on
    2 CPU ranks: 15% of a step, BENCHMARKS.md). Never with activation checkpointing (its
    layers keep no KV cache): ``on`` with it is an unusable setting (exit 2).
    """
    if spec.activation_checkpointing:
        if setting == "on":
            raise UnusableSetting("grpo.sharedPrefix: on needs the layers' KV cache, which activation checkpointing "
                                  "(grpo.activationCheckpointing) does not keep; set sharedPrefix auto or off")
        return False
    return setting == "on" or (setting == "auto" and spec.zero_stage != 3)


@torch.no_grad()
def frozen_logprobs(model, batch, rows, grpo, device, shared_prefix: bool = True) -> torch.Tensor:
    """(B, T) log-probs under a model that does not change during the update (an engine)."""
    parts = [sequence_logprobs(model, batch, micro, grpo.temperature, device, shared_prefix=shared_prefix)[0].cpu()
             for micro in micro_batches(rows, grpo.micro_batch_size)]
    return torch.cat(parts)


def train_minibatch(state: GRPOState, batch, mini: list[int], advantages, old, ref,
                    shared_prefix: bool = True, cold=None) -> dict[str, torch.Tensor]:
    """Accumulate gradients over micro-batches, average over ranks, clip, step."""
    grpo, device, engine = state.config.grpo, state.env.device, state.engine
    engine.zero_grad()
    acc: dict[str, torch.Tensor] = {}
    micros = micro_batches(mini, grpo.micro_batch_size)
    for index, micro in enumerate(micros):
        logprobs, entropy = sequence_logprobs(engine, batch, micro, grpo.temperature, device, with_entropy=True,
                                              shared_prefix=shared_prefix)
        mask = batch.loss_mask[micro].to(device)
        old_lp = old[micro].to(device) if old is not None else logprobs.detach()
        ref_lp = ref[micro].to(device) if ref is not None else None
        if grpo.loss_aggregation == "dr_grpo":  # its divisor is the stage's budget, not this batch's width
            width = state.config.ptst.max_completion_length
            logprobs, old_lp, ref_lp, mask = (pad_to_width(t, width) for t in (logprobs, old_lp, ref_lp, mask))
        loss, stats = policy_loss(
            logprobs, old_lp, ref_lp,
            advantages[micro].to(device),
            mask,
            epsilon_low=grpo.epsilon_low,
            epsilon_high=grpo.epsilon_high,
            beta=grpo.beta if ref is not None else 0.0,
            aggregation=grpo.loss_aggregation,
            importance=grpo.importance_sampling,
        )
        weight = aggregation_weight(batch.loss_mask, micro, mini, grpo.loss_aggregation)
        engine.backward(loss * weight, last=index == len(micros) - 1)
        width = entropy.shape[1]
        stats = {**stats, "loss": loss.detach(), "entropy": masked_mean(entropy, mask[:, :width])}
        stats["kl_cold_start"] = stats["kl"] if cold is None else masked_mean(
            kl_k3(logprobs[:, :width].detach(), cold[micro].to(device)), mask[:, :width])
        for key, value in stats.items():
            acc[key] = acc.get(key, torch.tensor(0.0)) + value.detach().cpu() * weight
    acc["grad_norm"] = engine.step()
    state.rollout.sync_weights(engine)
    return acc


def pad_to_width(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """``(b, T) -> (b, max(T, width))``, zeros on the right (masked out: they add nothing)."""
    if t is None or t.shape[1] >= width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)


# --- the stage ------------------------------------------------------------------------------


def engine_spec(config: GRPOStageConfig, env: DistEnv) -> EngineSpec:
    """What the policy's engine runs, from the stage's settings."""
    grpo = config.grpo
    longest = grpo.max_prompt_length + config.ptst.max_completion_length
    return EngineSpec(grpo.deepspeed_zero_stage, precision_of(config.model.dtype, env.device), grpo.micro_batch_size,
                      grpo.max_grad_norm, grpo.learning_rate,
                      activation_checkpointing=activation_checkpointing_on(grpo.activation_checkpointing, longest),
                      field="grpo.deepspeedZeroStage")


def load_models(config: GRPOStageConfig, env: DistEnv, work: Path, weights_dir: Path | None = None):
    """The policy's engine (weights from ``weights_dir``, a checkpoint, else the stage's
    starting model), the frozen reference (the starting model, for the KL term), the
    tokenizer and the image processor.

    The reference is the stage's starting point on every attempt, also after a resume.
    Both load through their engine, so under ZeRO-3 both are partitioned as they load,
    each as a ``LogprobModel`` (grpo/logprob_head.py): the Hugging Face model, with the
    Hugging Face parameter names, whose forward also scores completion tokens chunk by chunk.
    """
    source = resolve_model_dir(config.init_uri or config.model.name, config.storage, work)
    model = config.model
    tokenizer, image_processor = load_processor_parts(model.processor or source)
    spec = engine_spec(config, env)

    def loader(directory: str):
        # Both score completions through LogprobModel's chunked head (no (b, T, V) logits);
        # wrapped before the engine sees the model, so DeepSpeed hooks the head it calls.
        return lambda: LogprobModel(load_model(directory, model.dtype, model.attn_implementation, env.device))

    def policy():
        if not config.grpo.lora.enabled:
            return loader(str(weights_dir) if weights_dir else source)()
        # LoRA: the frozen base is the stage's starting model; a checkpoint holds the adapters
        base = load_model(source, model.dtype, model.attn_implementation, env.device)
        adapt_for_stage(base, config.grpo.lora, weights_dir.parent if weights_dir else None, "grpo.lora")
        return LogprobModel(base)

    engine = make_engine(policy, lambda: load_model_config(source), env, spec)
    engine.train()
    cold = cold_start_source(config, work, source)
    anchor = cold if config.grpo.reference == "coldStart" else source
    reference = None
    if config.grpo.beta > 0:
        reference = make_reference(loader(anchor), lambda: load_model_config(source), env, spec)
    # The cold-start model, for kl_cold_start: the reference itself when it is one. Loaded
    # with the RNG state put back after, so the stage samples what it did without it.
    cold_start = reference if reference is not None and anchor == cold else None
    if cold_start is None:
        with torch.random.fork_rng(devices=[] if env.device == "cpu" else [env.device]):
            cold_start = make_reference(loader(cold), lambda: load_model_config(source), env, spec)
    return source, engine, reference, tokenizer, image_processor, cold_start


def cold_start_source(config: GRPOStageConfig, work: Path, source: str) -> str:
    """The cold-start model's directory: the SFT output (``coldStartUri``), else the base
    model; ``source`` (not fetched again) when the stage starts from it (PTST stage 1)."""
    uri = config.cold_start_uri or config.model.name
    if uri == (config.init_uri or config.model.name):
        return source
    return resolve_model_dir(uri, config.storage, work)


def run(config: GRPOStageConfig) -> dict[str, Any]:
    return run_on_ranks(config, train_stage)


def check_rank_split(config: GRPOStageConfig, env: DistEnv) -> None:
    """Refuse batch sizes that do not split evenly over the ranks (exit 2, naming the field)."""
    problems = config.grpo.rank_split_problems(env.world_size)
    if problems:
        raise UnusableSetting("; ".join(f"grpo.{field}: {message}" for field, message in problems))


def train_stage(config: GRPOStageConfig, env: DistEnv, work: Path, metrics: StageMetrics) -> dict[str, Any]:
    grpo = config.grpo
    check_rank_split(config, env)
    shared_prefix_on(grpo.shared_prefix, engine_spec(config, env))  # on with activation checkpointing exits 2 here
    scorer = RewardScorer.from_settings(grpo).start()  # a plug-in that does not import exits 2 before any model loads
    try:
        return _train(config, env, work, metrics, scorer)
    finally:
        scorer.close()


def _train(config: GRPOStageConfig, env: DistEnv, work: Path, metrics: StageMetrics, scorer) -> dict[str, Any]:
    from ..data.formats import read_rl

    grpo, total = config.grpo, config.ptst.steps
    torch.manual_seed(grpo.seed + env.rank)
    ckpt = CheckpointManager(config.output_uri, config.storage, work)
    validation_items = load_validation_items(config)  # an unreadable split exits 2 before any model loads
    found = ckpt.restore_dir()  # resume: weights load into the engine as it is built
    source, engine, reference, tokenizer, image_processor, cold_start = load_models(
        config, env, work, found[1] / "model" if found else None
    )
    data = read_rl(config.data, config.storage)
    if not data.items:
        raise RuntimeError(f"{config.data.source}: no usable RL rows (skipped: {dict(data.skipped)})")
    examples = stage_examples(data.items, config.ptst.data_slice, tokenizer)
    start = ckpt.load_ranked(found, engine, env) if found else 0
    if found is None:
        engine.broadcast_from_rank0()
    metrics.rewind(start, found[1] / METRICS_LOG if found else None)
    state = GRPOState(
        config, env, engine, reference, tokenizer, image_processor,
        make_rollout(grpo.rollout_backend, engine, tokenizer, env, config), examples,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scorer, cold_start, validation_items=validation_items,
    )
    metrics.set(total_steps=total)
    metrics.event("start", step=start, init=source, examples=len(examples), rl_rows=len(data.items),
                  skipped=dict(data.skipped), resumed=found is not None, attempt=config.attempt,
                  **engine.describe())
    log.info("PTST stage %d/%d: %d x %d, steps %d..%d, from %s, %s", config.ptst_index, config.ptst_total,
             config.ptst.max_completion_length, config.ptst.num_generations, start, total, source,
             engine.describe())
    return run_steps(state, ckpt, metrics, start, total)


def run_steps(state: GRPOState, ckpt: CheckpointManager, metrics: StageMetrics, start: int, total: int) -> dict[str, Any]:
    """Steps ``start..total`` of the stage, its checkpoints and its committed model."""
    config, env, engine, tokenizer, image_processor = (state.config, state.env, state.engine, state.tokenizer,
                                                       state.image_processor)
    grpo = config.grpo
    for step in range(start, total):
        if stop_requested():
            save_checkpoint(state, ckpt, metrics, step)
            raise StageStopped(stage_summary(state, step, total, None))
        stats = grpo_step(state, step)
        if validation_due(config, step + 1):  # every rank takes part (grpo/validation.py)
            stats.update(validate(state, state.validation_items, step + 1))
        state.history.append(stats)
        if env.is_main:
            metrics.log(step + 1, stats)
            log.info("step %d/%d reward %.3f len %.1f kl %.4f", step + 1, total, stats["reward_mean"],
                     stats["completion_length_mean"], stats["kl"])
        if (step + 1) % grpo.save_every_steps == 0 and step + 1 < total:
            save_checkpoint(state, ckpt, metrics, step + 1)
    record_replicas(engine, env, metrics)
    save_checkpoint(state, ckpt, metrics, total)
    weights = engine.full_state_dict()  # collective under ZeRO-3: every rank takes part
    uri = None
    if env.is_main:
        uri = ckpt.commit_model(engine, tokenizer, image_processor,
                                {"stage": config.stage, "step": total}, state_dict=weights)
    barrier(env)
    summary = stage_summary(state, total, total, uri)
    if env.is_main:
        ckpt.store.put_json("summary.json", summary)
    return summary


def stage_examples(items: list, data_slice, tokenizer) -> list:
    """The RL rows this PTST stage trains on: all, or its ``dataSlice`` (FastCuRL)."""
    if data_slice is None:
        return items
    if data_slice.by == "promptLength":  # the question's text tokens (image tokens not counted)
        keys = torch.tensor([len(tokenizer(ex.problem, add_special_tokens=False).input_ids) for ex in items])
    else:
        keys = torch.arange(len(items))
    chosen = curriculum_slice(keys, data_slice.start, data_slice.end).tolist()
    if not chosen:
        raise UnusableSetting(f"ptst.dataSlice: [{data_slice.start}, {data_slice.end}) of {len(items)} RL rows is empty")
    return [items[i] for i in chosen]


def record_replicas(engine, env: DistEnv, metrics: StageMetrics) -> None:
    """Check that data-parallel replicas agree (raises if not) and log what was checked.

    Under ZeRO-3 there are no replicas (each rank holds a partition): ``identical`` is
    then null and ``checked`` false rather than a claim nothing supports.
    """
    identical = engine.verify_replicas_identical()
    metrics.event("replicas", world_size=env.world_size, identical=identical, checked=identical is not None)


def precision_of(dtype: str, device: str) -> str:
    """The training precision of a model dtype setting (``auto``: bf16 on GPU, fp32 on CPU)."""
    resolved = torch_dtype(dtype, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolved, "fp32")


def save_checkpoint(state: GRPOState, ckpt: CheckpointManager, metrics: StageMetrics, step: int) -> None:
    """Commit the training state and the metrics log so far (every rank its shard; rank 0 the rest)."""
    files = {METRICS_LOG: metrics.jsonl_path} if metrics.jsonl_path else {}
    uri = ckpt.save_ranked(step, state.engine, state.env, extra_files=files)
    if state.env.is_main:
        metrics.event("checkpoint", step=step, uri=uri)


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
        **validation_summary(state.history),
        "artifactUri": uri,
    }


def validation_summary(history: list[dict]) -> dict[str, Any]:
    """The last validation's accuracy and step (none when validation is off or has not run)."""
    last = next((h for h in reversed(history) if "validation_accuracy" in h), None)
    if last is None:
        return {}
    return {"validationAccuracy": round(last["validation_accuracy"], 4), "validationStep": int(last["validation_step"])}
