"""Cold-start SFT: full fine-tuning of a Qwen2-VL / Qwen2.5-VL model on the cold-start set.

``python -m visionr1_trainer sft --config stage.json`` runs ``run(config)``. Read
``train_step`` for one optimizer step: the micro-batches of the step, a forward pass
each, the summed token cross-entropy of the assistant tokens (from the chunked log-prob
head the GRPO stage uses: no full-vocabulary logits) divided by the number of such
tokens in the whole step (over every micro-batch and rank, so gradient
accumulation and data parallelism give the gradient of one big batch), then one update.

Data comes from the bridge stage's committed ``dataset`` (``dataUri``) or a given set
(``data``). The stage commits a resumable checkpoint every ``saveEverySteps`` steps
(weights, optimizer, RNG, step; the data order and the learning rate are functions of
the step), resumes from the newest one after a kill, and commits the final model as
the artifact ``model``, which the first PTST stage starts from. With
``deepspeedZeroStage`` > 0 the model is run and updated by DeepSpeed ZeRO (the GRPO
stage's engine, ``grpo.engine``), on GPUs or CPU ranks; ``torchrun`` starts one process
per GPU and node. Every forward pass goes through the engine.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointManager, MODEL, resolve_model_dir
from ..config import DatasetRef, SFTStageConfig, activation_checkpointing_on
from ..distributed import DistEnv, all_reduce_mean, barrier, run_on_ranks
from ..metrics import METRICS_LOG, StageMetrics
from ..models.loading import load_model_config, load_processor_parts
from ..models.loading import load_model as load_weights
from ..models.lora import adapt_for_stage
from ..models.vlm import IMAGE_TOKEN
from ..runtime import StageStopped, stop_requested
from .batches import Batch, collate, epoch_micro_batches, load_group
from .cache import load_or_encode
from .data import IGNORE_INDEX, TrainingData, build_training_data
from .images import ImageBounds
from .schedule import StepPlan, lr_multiplier, micro_batches_of_step, step_plan

log = logging.getLogger("visionr1.sft")
LOAD_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run(config: SFTStageConfig) -> dict[str, Any]:
    return run_on_ranks(config, train_stage)


# --- the loss and one step -------------------------------------------------------------------


def labelled_logprob_sum(engine, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the labelled tokens, through the engine's chunked head.

    The engine holds a ``LogprobModel`` (``grpo.logprob_head``): given the targets it returns
    their log-probs from hidden states a chunk of positions at a time, so no (B, T, V)
    logits exist in forward or backward (at 16K tokens and Qwen's 152K vocabulary those
    are 10 GB in float32 per sample). ``labels``: (B, T), -100 where there is no loss;
    position t predicts token t+1. Returns the sum (a scalar), as ``token_loss_sum``.
    """
    targets = labels[:, 1:]  # (B, T-1)
    logprobs, _ = engine(targets=targets.clamp(min=0), **inputs)  # (B, T-1) float32
    return -(logprobs * (targets != IGNORE_INDEX)).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the labelled tokens.

    ``logits``: (B, T, V); ``labels``: (B, T) with -100 where there is no loss. Position
    t predicts token t+1, hence the shift. Returns a scalar: the sum, not the mean; the
    caller divides by the step's labelled-token count.
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # float32: stable log-softmax
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def global_sum(value: float, env: DistEnv) -> float:
    return float(all_reduce_mean(torch.tensor(float(value)), env)) * env.world_size


def train_step(engine, batches: Sequence[Batch], env: DistEnv, lr: float) -> dict[str, float]:
    """One optimizer step over ``batches`` (this rank's micro-batches); returns its metrics.

    Every rank must pass the same number of micro-batches (under ZeRO each forward and
    backward is a collective); ``epoch_micro_batches`` deals them out evenly.
    """
    engine.set_lr(lr)
    targets = max(1.0, global_sum(sum(b.target_tokens for b in batches), env))
    engine.zero_grad()
    loss_sum = 0.0
    for index, batch in enumerate(batches):
        inputs = {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
        loss = labelled_logprob_sum(engine, inputs, batch.labels.to(env.device))
        # Ranks' gradients are averaged, so scale by world size: the sum over ranks of
        # these losses is the summed loss of the whole step divided by all its tokens.
        engine.backward(loss * env.world_size / targets, last=index == len(batches) - 1)
        loss_sum += float(loss.detach())
    grad_norm = float(engine.step())
    return {"loss": global_sum(loss_sum, env) / targets, "grad_norm": grad_norm, "learning_rate": lr,
            "tokens": global_sum(sum(b.tokens for b in batches), env), "target_tokens": targets}


# --- data ------------------------------------------------------------------------------------


def data_ref(config: SFTStageConfig) -> DatasetRef:
    """The bridge stage's committed data set, or the given one."""
    return DatasetRef(source=config.data_uri) if config.data_uri else config.data


class StepBatches(torch.utils.data.Dataset):
    """Micro-batch ``(epoch, index)`` -> collated ``Batch``; the DataLoader's workers prefetch."""

    def __init__(self, data: TrainingData, image_processor, batch_size: int, seed: int, env: DistEnv,
                 pad_token_id: int, image_token_id: int, bounds: ImageBounds = ImageBounds()):
        self.data, self.image_processor, self.batch_size, self.seed = data, image_processor, batch_size, seed
        self.rank, self.world_size = env.rank, env.world_size
        self.pad_token_id, self.image_token_id, self.bounds = pad_token_id, image_token_id, bounds

    @lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_micro_batches(len(self.data.groups), self.batch_size, epoch, self.seed, self.rank, self.world_size)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, index = key
        groups = [load_group(self.data.group(g), self.image_processor, self.bounds, self.data.packed,
                             self.image_token_id) for g in self.epoch(epoch)[index]]
        return collate(groups, self.pad_token_id, self.image_token_id)

    def __len__(self) -> int:
        return len(self.data.groups)


def _identity(batch: Batch) -> Batch:
    return batch  # the dataset collates: one item is already a micro-batch


def step_loader(dataset: StepBatches, plan: StepPlan, accumulation: int, start: int, device: str):
    """Micro-batches of steps ``start`` .. ``plan.total_steps - 1``, in order, prefetched."""
    keys = [k for step in range(start, plan.total_steps) for k in micro_batches_of_step(step, plan, accumulation)]
    workers = int(os.environ.get("VISIONR1_DATA_WORKERS", 4 if device.startswith("cuda") else 0))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=keys, num_workers=workers,
                                            collate_fn=_identity, pin_memory=device.startswith("cuda")))


# --- model and engine -----------------------------------------------------------------------


def engine_spec(config: SFTStageConfig, env: DistEnv):
    """What the SFT engine runs, from the stage's settings."""
    from ..grpo.engine import EngineSpec

    sft = config.sft
    return EngineSpec(sft.deepspeed_zero_stage, sft.precision, sft.per_device_batch_size, sft.max_grad_norm,
                      sft.learning_rate, sft.weight_decay,
                      activation_checkpointing=activation_checkpointing_on(sft.activation_checkpointing,
                                                                           sft.cutoff_length),
                      field="sft.deepspeedZeroStage")


def load_model(config: SFTStageConfig, env: DistEnv, work: Path, weights_dir: Path | None):
    """The engine holding the model to fine-tune (the newest checkpoint's weights when
    resuming), with the tokenizer and image processor. Under ZeRO-3 the model is
    partitioned as it loads."""
    from ..grpo.engine import make_engine
    from ..grpo.logprob_head import LogprobModel

    source = resolve_model_dir(config.model.name, config.storage, work)
    tokenizer, image_processor = load_processor_parts(config.model.processor or source)

    lora = config.sft.lora

    def load():
        # LoRA: the frozen base is always the starting model; a checkpoint holds the adapters
        # (and any vision part left trainable) unmerged, loaded by adapt_for_stage.
        directory = str(weights_dir) if weights_dir and not lora.enabled else source
        model = load_weights(directory, LOAD_DTYPE[config.sft.precision], config.model.attn_implementation, env.device)
        # Before the optimizer is built: it never sees the frozen parameters.
        freeze_vision(model, config.sft.freeze_vision_tower, config.sft.freeze_multi_modal_projector)
        # The vision tower and projector keep their freeze settings; the language model trains adapters only.
        adapt_for_stage(model, lora, weights_dir.parent if weights_dir and lora.enabled else None, "sft.lora",
                        keep_trainable=lambda name: "visual" in name.split("."))
        return LogprobModel(model)  # the loss reads log-probs from a chunked head

    engine = make_engine(load, lambda: load_model_config(source), env, engine_spec(config, env))
    engine.train()
    return source, engine, tokenizer, image_processor


def freeze_vision(model, tower: bool, projector: bool) -> dict[str, int]:
    """Freeze Qwen2-VL's vision tower (patch embedding and blocks) and/or its projector
    (``visual.merger``), as LLaMA-Factory's ``freeze_vision_tower`` and
    ``freeze_multi_modal_projector`` do (both on by default there and here); returns the
    number of parameters left trainable in each part."""
    vision = getattr(model, "visual", None) or model.model.visual
    for name, param in vision.named_parameters():
        in_projector = name.startswith("merger.")
        if (projector if in_projector else tower):
            param.requires_grad_(False)
    parts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    vision_ids = {id(p) for p in vision.parameters()}
    merger_ids = {id(p) for p in vision.merger.parameters()}
    for param in model.parameters():
        part = "projector" if id(param) in merger_ids else "vision_tower" if id(param) in vision_ids else "language_model"
        parts[part] += param.numel() if param.requires_grad else 0
    return parts


# --- the stage --------------------------------------------------------------------------------


@dataclass
class SFTRun:
    """Everything the training loop needs, built once per stage by ``prepare``."""

    config: SFTStageConfig
    env: DistEnv
    ckpt: CheckpointManager
    engine: Any
    tokenizer: Any
    image_processor: Any
    data: TrainingData
    plan: StepPlan
    start: int  # the first step to run (the checkpoint's step when resuming)
    found: tuple[str, Path] | None  # the checkpoint resumed from
    info: dict[str, Any]  # samples and skipped rows, for the summary


def prepare(config: SFTStageConfig, env: DistEnv, work: Path, ckpt: CheckpointManager) -> SFTRun:
    """Model (from the newest checkpoint when resuming), data, step plan and engine."""
    from ..data.formats import read_cold

    sft = config.sft
    torch.manual_seed(sft.seed)
    found = ckpt.restore_dir()  # resume: the weights load into the engine as it is built
    source, engine, tokenizer, image_processor = load_model(config, env, work, found[1] / "model" if found else None)
    read = read_cold(data_ref(config), config.storage, work / "cache")
    bounds = image_bounds(sft)
    encoded, encode_skipped, cached = load_or_encode(ckpt.store, work, read.items, tokenizer, image_processor,
                                                     sft.cutoff_length, bounds, env, lambda: barrier(env))
    data = build_training_data(read.items, tokenizer, image_processor, sft.cutoff_length, sft.packing, bounds,
                               encoded=encoded, skipped=encode_skipped)
    skipped = {**dict(read.skipped), **{k: v for k, v in data.skipped.items() if v}}
    if not data.samples:
        raise RuntimeError(f"{data_ref(config).source}: no usable cold-start samples (skipped: {skipped})")
    plan = step_plan(len(data.groups), sft.per_device_batch_size, sft.gradient_accumulation_steps,
                     sft.epochs, sft.warmup_ratio, env.world_size)
    start = ckpt.load_ranked(found, engine, env) if found else 0
    if found is None:
        engine.broadcast_from_rank0()  # every rank starts from rank 0's weights
    log.info("SFT of %s on %d samples (%d sequences): steps %d..%d, %d per epoch", source,
             len(data.samples), len(data.groups), start, plan.total_steps, plan.steps_per_epoch)
    return SFTRun(config, env, ckpt, engine, tokenizer, image_processor, data, plan, start, found,
                  {"samples": len(data.samples), "skipped": skipped, "model": source, "encoding_cached": cached})


def image_bounds(sft) -> ImageBounds:
    return ImageBounds(sft.image_max_pixels, sft.image_min_pixels)


def train_stage(config: SFTStageConfig, env: DistEnv, work: Path, metrics: StageMetrics) -> dict[str, Any]:
    ckpt = CheckpointManager(config.output_uri, config.storage, work)
    if ckpt.store.is_committed(MODEL) and ckpt.store.get_json("summary.json", None):
        log.info("%s/%s is already committed; nothing to do", ckpt.store.uri, MODEL)
        return ckpt.store.get_json("summary.json")
    run = prepare(config, env, work, ckpt)
    metrics.rewind(run.start, run.found[1] / METRICS_LOG if run.found else None)
    metrics.set(total_steps=run.plan.total_steps)
    metrics.event("start", step=run.start, sequences=len(run.data.groups), resumed=run.found is not None,
                  attempt=config.attempt, **run.info, **run.engine.describe())
    history = train_loop(run, metrics)
    save_checkpoint(run.engine, ckpt, metrics, env, run.plan.total_steps)
    weights = run.engine.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    uri = None
    if env.is_main:
        uri = ckpt.commit_model(run.engine, run.tokenizer, run.image_processor,
                                {"stage": config.stage, "step": run.plan.total_steps}, state_dict=weights)
    barrier(env)
    summary = stage_summary(history, run.plan.total_steps, run.plan, uri, run.info)
    if env.is_main:
        ckpt.store.put_json("summary.json", summary)
    return summary


def train_loop(run: SFTRun, metrics: StageMetrics) -> list[dict[str, float]]:
    """Steps ``run.start`` .. end: a checkpoint every ``saveEverySteps``, and on a stop request."""
    sft, plan, env = run.config.sft, run.plan, run.env
    dataset = StepBatches(run.data, run.image_processor, sft.per_device_batch_size, sft.seed, env,
                          run.tokenizer.pad_token_id, run.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                          image_bounds(sft))
    batches = step_loader(dataset, plan, sft.gradient_accumulation_steps, run.start, env.device)
    history: list[dict[str, float]] = []
    for step in range(run.start, plan.total_steps):
        if stop_requested():
            save_checkpoint(run.engine, run.ckpt, metrics, env, step)
            raise StageStopped(stage_summary(history, step, plan, None, run.info))
        started = time.monotonic()
        micro = [next(batches) for _ in micro_batches_of_step(step, plan, sft.gradient_accumulation_steps)]
        lr = sft.learning_rate * lr_multiplier(step, plan.total_steps, plan.warmup_steps, sft.lr_scheduler)
        stats = train_step(run.engine, micro, env, lr)
        stats["tokens_per_second"] = stats["tokens"] / max(time.monotonic() - started, 1e-9)
        stats["epoch"] = (step + 1) / plan.steps_per_epoch
        history.append(stats)
        if env.is_main:
            metrics.log(step + 1, stats)
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step + 1, plan.total_steps, stats["loss"],
                     lr, stats["tokens_per_second"])
        if (step + 1) % sft.save_every_steps == 0 and step + 1 < plan.total_steps:
            save_checkpoint(run.engine, run.ckpt, metrics, env, step + 1)
    return history


def save_checkpoint(engine, ckpt: CheckpointManager, metrics: StageMetrics, env: DistEnv, step: int) -> None:
    """Commit weights, optimizer, RNG and the metrics log (every rank its shard; rank 0 the rest)."""
    files = {METRICS_LOG: metrics.jsonl_path} if metrics.jsonl_path else {}
    uri = ckpt.save_ranked(step, engine, env, extra_files=files)
    if env.is_main:
        metrics.event("checkpoint", step=step, uri=uri)


def stage_summary(history: list[dict[str, float]], step: int, plan: StepPlan, uri: str | None,
                  info: dict[str, Any]) -> dict[str, Any]:
    """The compact exit summary: the last step and the recent steps' mean metrics."""
    recent = history[-5:]

    def mean(key: str) -> float | None:
        values = [h[key] for h in recent if key in h and math.isfinite(h[key])]
        return round(sum(values) / len(values), 6) if values else None

    return {"step": step, "totalSteps": plan.total_steps, "loss": mean("loss"),
            "learningRate": recent[-1]["learning_rate"] if recent else None,
            "tokensPerSecond": mean("tokens_per_second"), "samples": info["samples"],
            "skipped": info["skipped"], "artifactUri": uri}
