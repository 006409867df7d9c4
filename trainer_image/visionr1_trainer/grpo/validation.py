"""Validation during GRPO training: accuracy on a held-out split every ``everySteps`` steps.

``grpo.validation`` names the split: one of ``spec.data.benchmarks`` (the plan hands the
stage its ``BenchmarkSpec`` as ``validationBenchmark``) or ``data``, rows in the RL set's
format, read as the ``synthetic`` benchmark format (the RL schema: problem, answer,
images). Items are read once, at the stage's start (``load_validation_items``).

Every ``everySteps`` steps (``due``), ``validate``:

1. gives each rank its share of the items (round robin) and samples one completion per
   item with the stage's own rollout backend (``state.rollout``: the HF sampler on the
   policy itself, or the colocated vLLM engine, refreshed after every optimizer step),
   greedily at temperature 0, within ``maxTokens`` (default the PTST stage's budget), on
   the prompt the eval stage uses (``eval.sampling.prompt_text``). Every rank runs the
   same number of rollout calls (a rank short of items or with only too-long prompts
   fills its call with a one-token prompt whose result is dropped): under ZeRO-3 each
   rollout gathers the weights, a collective, and tensor-parallel vLLM is one too. The
   training RNG is forked around it, so a stage with validation trains on the same
   samples as one without;
2. scores each completion with the eval stage's rules (``eval.scoring.score``), gathers
   every rank's records and sums them up with the eval stage's ``summarize``
   (``validation_metrics``), so a validation accuracy is an eval accuracy on the same items.

The numbers join the step's metrics (``validation_accuracy``, ``validation_format_rate``,
``validation_length_mean``, ``validation_truncated_rate``, ``validation_samples``,
``validation_seconds``, ``validation_step``): one line of the metrics log, Prometheus gauges
``visionr1_validation_*``, and the stage summary's ``validationAccuracy``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from ..config import BenchmarkSpec, GRPOStageConfig
from ..eval.benchmarks import EvalItem, load_benchmark
from ..eval.sampling import Sample, prompt_text
from ..eval.scoring import score, summarize
from ..models.vlm import encode_prompts
from ..runtime import UnusableSetting
from .rollout import SamplingSettings

log = logging.getLogger("visionr1.grpo")

CHUNK = 16  # items per rollout call on each rank
# The step argument of validation rollouts (vLLM's seeds): apart from the training steps'.
STEP_OFFSET = 1 << 40
FIELD = "grpo.validation"
_FILLER = "?"  # the prompt of a rank's call with nothing of its own to sample


def validation_spec(config: GRPOStageConfig) -> BenchmarkSpec | None:
    """The held-out split's benchmark spec, or None when validation is off."""
    settings = config.grpo.validation
    if settings.every_steps <= 0:
        return None
    if settings.benchmark is not None:
        return config.validation_benchmark
    return BenchmarkSpec.model_validate({"name": "validation", "format": "synthetic", "data": settings.data})


def load_validation_items(config: GRPOStageConfig) -> list[EvalItem]:
    """The items scored at each validation (the first ``limit``); [] when off. A split that
    cannot be read or holds no usable row exits 2 naming the field."""
    spec = validation_spec(config)
    if spec is None:
        return []
    where = f"{FIELD}.benchmark ({spec.name})" if config.grpo.validation.benchmark else f"{FIELD}.data"
    try:
        result = load_benchmark(spec, config.storage)
    except Exception as exc:  # noqa: BLE001 - reported naming the field, before any step runs
        raise UnusableSetting(f"{where}: cannot read {spec.data.source}: {type(exc).__name__}: {exc}") from exc
    if not result.items:
        raise UnusableSetting(f"{where}: no usable rows in {spec.data.source} (skipped {dict(result.skipped)})")
    limit = config.grpo.validation.limit
    return result.items[:limit] if limit else result.items


def due(config: GRPOStageConfig, step: int) -> bool:
    """Whether validation runs after ``step`` steps (1-based: steps N, 2N, ...)."""
    every = config.grpo.validation.every_steps
    return every > 0 and step > 0 and step % every == 0


def record(item: EvalItem, sample: Sample) -> dict[str, Any]:
    """One item's record, with the fields the eval stage's ``summarize`` reads."""
    verdict = score(item, sample.text)
    return {"id": item.id, "correct": verdict.correct, "format_ok": verdict.format_ok,
            "extracted": verdict.extracted, "timed_out": verdict.timed_out, "tokens": sample.tokens,
            "truncated": sample.truncated, "error": sample.error, "attempts": 1,
            "categories": item.categories, "group": item.group}


def validation_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The step's ``validation_*`` metrics from every item's record (the eval stage's summary)."""
    summary = summarize(list(records))
    out = {
        "validation_accuracy": summary["accuracy"],
        "validation_format_rate": 1.0 - summary["formatFailureRate"],
        "validation_length_mean": summary["reasoningLengthMean"],
        "validation_truncated_rate": summary["truncatedRate"],
        "validation_samples": float(summary["n"]),
    }
    return {k: float(v) for k, v in out.items() if v is not None}


def validate(state, items: Sequence[EvalItem], step: int) -> dict[str, float]:
    """Sample and score ``items`` on every rank (each its share); the same metrics on every rank."""
    config, env = state.config, state.env
    settings = config.grpo.validation
    started = time.perf_counter()
    mine = list(range(env.rank, len(items), env.world_size))
    per_rank = -(-len(items) // env.world_size)
    sampling = SamplingSettings(1, settings.max_tokens or config.ptst.max_completion_length,
                                settings.temperature, 1.0)
    samples: list[Sample] = []
    devices = [] if env.device == "cpu" else [env.device]
    with torch.random.fork_rng(devices=devices):  # the training stream is left as it was
        torch.manual_seed(config.grpo.seed * 1_000_003 + step * 7919 + env.rank)
        for start in range(0, per_rank, CHUNK):
            chunk = [items[i] for i in mine[start:start + CHUNK]]
            samples += sample_chunk(state, chunk, sampling, STEP_OFFSET + step * 1024 + start)
    records = [(i, record(items[i], s)) for i, s in zip(mine, samples)]
    everyone = gather_objects(records, env)
    ordered = [r for _, r in sorted((pair for part in everyone for pair in part), key=lambda pair: pair[0])]
    out = validation_metrics(ordered)
    out["validation_seconds"] = time.perf_counter() - started
    out["validation_step"] = float(step)
    return out


def sample_chunk(state, chunk: list[EvalItem], sampling: SamplingSettings, call: int) -> list[Sample]:
    """One rollout call: a completion per item (``prompt_too_long`` for a prompt over
    ``maxPromptLength``). Runs the call even when nothing of ``chunk`` can be sampled."""
    from .collect import decode_completions

    tokenizer, image_processor = state.tokenizer, state.image_processor
    limit = state.config.grpo.max_prompt_length
    images = [item.load_images() for item in chunk]
    prompts = encode_prompts(tokenizer, image_processor, [prompt_text(item) for item in chunk], images, limit)
    out = [Sample(None, error="prompt_too_long") for _ in chunk]
    kept = list(prompts.kept)
    if not kept:  # take part in the collective all the same
        prompts, images = encode_prompts(tokenizer, image_processor, [_FILLER], [[]], limit), [[]]
    rollout = state.rollout.generate(prompts, [len(images[i]) for i in prompts.kept], sampling, step=call)
    texts = decode_completions(tokenizer, rollout.completion_ids, rollout.mask)
    for row, index in enumerate(kept):
        out[index] = Sample(texts[row], int(rollout.lengths[row]), bool(rollout.truncated[row]))
    return out


def gather_objects(value: Any, env) -> list[Any]:
    """``value`` of every rank, in rank order (a collective when there are several)."""
    if env.world_size <= 1 or env.backend is None:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out
