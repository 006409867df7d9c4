"""The bridge stage: Modality Bridging over a data set, sharded and resumable.

``python -m visionr1_trainer bridge --config stage.json`` runs ``run(config)``:

1. read the source rows (broken ones skipped and counted) and drop duplicate
   (image, question) pairs;
2. split them into ``shards`` fixed work units; the plan (which ids go in which shard)
   is stored beside the outputs, so a restarted stage finds the same shards;
3. phase 1, the multimodal model: for each shard not done yet, the pseudo-CoT (step 1)
   and the image description (step 2) of every row, committed as the artifact
   ``shards/describe-NNNNN``;
4. phase 2, the reasoning model: for each shard, the long CoT from description and
   question (step 3), parsed and filtered, every verdict committed as
   ``shards/reason-NNNNN``;
5. the kept samples, their images and ``stats.json`` committed as the artifact
   ``dataset`` (Vision-R1-cold, ShareGPT layout): the SFT stage's input.

Every unit of work is an artifact that becomes visible only when complete, and the
shards partition the rows, so a stage killed at any point and started again redoes at
most the shard it was in: no sample is lost and none appears twice. Shards are small by
default (``shardSize`` 64 rows) so that a kill costs minutes of teacher work. All
multimodal work runs before any reasoning work, so two vLLM engines never hold the GPUs
at once.

A teacher that fails (endpoint down, 5xx, timeouts after the backend's retries) does not
empty the data set: such rows are committed as pending (``retryable``) and asked again on
the next run, and a phase in which more than ``maxFailureRate`` of the rows failed ends
the stage with ``TeacherFailed``, naming the endpoint and the errors. A backend whose
circuit breaker opened stops the stage at once. Failures of the request itself (refused
as malformed, too long) and chains of thought cut at the token budget (step 3's
``finish_reason`` ``length``: dropped as ``truncated``) are final.

Text-only rows (no image) skip steps 1 and 2: the reasoning model gets the question
alone (``prompts.TEXT_ONLY_REASONING``), and the sample is a text-only cold-start row.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import open_stage_store
from ..config import BridgeStageConfig
from ..data.formats import BridgeExample, cold_row, read_bridge_source, write_rows
from ..metrics import METRICS_LOG, StageMetrics
from ..runtime import StageStopped, stop_requested, work_dir
from . import prompts
from .backends import Completion, GeneratorContext, Request, make_generator
from .filters import DROP_REASONS, build_sample, filter_reason, parse_reasoning
from .stats import dataset_stats, reflection_counts

log = logging.getLogger("visionr1.bridge")

DATASET = "dataset"
PLAN_KEY = "shards/plan.json"
ROWS = "rows.jsonl"


class NothingKept(RuntimeError):
    """The stage would commit an empty data set, or a shard got no answer at all: it fails,
    saying why, instead of succeeding (and being frozen) with nothing for SFT to train on."""


class TeacherFailed(NothingKept):
    """Too many of a phase's requests failed, or the backend's circuit breaker opened: the
    stage fails naming the teacher; the failed rows stay pending for the next run."""


def describe_name(shard: int) -> str:
    return f"shards/describe-{shard:05d}"


def reason_name(shard: int) -> str:
    return f"shards/reason-{shard:05d}"


def run(config: BridgeStageConfig) -> dict[str, Any]:
    work = work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    metrics = StageMetrics(config.run, config.stage, config.metrics_port, work / METRICS_LOG)
    try:
        return bridge_stage(config, work, metrics.start())
    finally:
        metrics.close()


# --- source, dedupe, plan -------------------------------------------------------------------


def read_source(config: BridgeStageConfig, cache: Path):
    """The source rows, at most ``sampleLimit`` of them (and the ref's own ``limit``)."""
    ref = config.source
    limits = [x for x in (ref.limit, config.bridge.sample_limit) if x is not None]
    if limits:
        ref = ref.model_copy(update={"limit": min(limits)})
    return read_bridge_source(ref, config.storage, cache)


def dedupe(items: Sequence[BridgeExample]) -> tuple[list[BridgeExample], int]:
    """First occurrence of each (image bytes, question) pair; and how many were dropped."""
    seen: set[str] = set()
    out = []
    for item in items:
        digest = hashlib.sha256(" ".join(item.question.split()).casefold().encode())
        for path in item.image_paths:
            digest.update(Path(path).read_bytes())
        key = digest.hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out, len(items) - len(out)


def shard_plan(ids: Sequence[str], shards: int | None, shard_size: int = 64) -> list[list[str]]:
    """Contiguous, nearly equal shards of ``ids`` (empty shards dropped): ``shards`` of them,
    or (unset) as many as ``shard_size`` rows each gives."""
    if shards is None:
        shards = max(1, -(-len(ids) // shard_size))
    size = -(-len(ids) // shards) if ids else 1
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


def load_or_save_plan(store, plan: list[list[str]]) -> list[list[str]]:
    """The stored plan of an earlier attempt, which must match this one; else store this."""
    stored = store.get_json(PLAN_KEY, None)
    if stored is None:
        store.put_json(PLAN_KEY, {"shards": plan})
        return plan
    if stored.get("shards") != plan:
        raise RuntimeError(
            f"{store.uri}/{PLAN_KEY}: the source rows, sampleLimit or shards changed since this "
            "stage started; finished shards would not line up with the new plan. Restore the "
            f"settings, or delete {store.uri}/shards to start the bridge over")
    return plan


# --- the two phases --------------------------------------------------------------------------


def describe_shard(generator, items: Sequence[BridgeExample], templates: dict[str, str], progress) -> list[dict]:
    """Steps 1 and 2 (multimodal model) for one shard's rows; text-only rows skip both."""
    visual = [it for it in items if it.image_paths]
    first = generator.generate([
        Request(f"{it.id}/pseudo_cot", "pseudo_cot",
                prompts.render(templates["pseudo_cot"], question=it.question, answer=it.answer),
                tuple(it.image_paths), it.meta)
        for it in visual], progress)
    ok = [(it, c) for it, c in zip(visual, first) if usable(c)]
    second = generator.generate([
        Request(f"{it.id}/description", "description",
                prompts.render(templates["description"], question=it.question, pseudo_cot=c.text),
                tuple(it.image_paths), it.meta)
        for it, c in ok], progress)
    described = {it.id: (c.text, d) for (it, c), d in zip(ok, second)}
    firsts = {it.id: c for it, c in zip(visual, first)}
    rows = []
    for it in items:
        if not it.image_paths:
            rows.append({"id": it.id, "pseudo_cot": None, "description": None, "text_only": True,
                         "error": None, "retryable": False})
            continue
        pseudo_cot, desc = described.get(it.id, (None, firsts[it.id]))
        failed = desc if not usable(desc) else None
        rows.append({"id": it.id, "pseudo_cot": pseudo_cot, "description": None if failed else desc.text,
                     "error": failure_kind(failed) if failed else None,
                     "retryable": bool(failed and failed.retryable)})
    return rows


def usable(c: Completion) -> bool:
    """A step 1-2 completion to go on with. One cut at the budget is still used: it is only
    the reasoning model's input, and the kept chain of thought (step 3) is checked."""
    return c.text is not None


def failure_kind(c: Completion) -> str:
    return c.error or "unknown"


def reason_shard(generator, items: Sequence[BridgeExample], described: dict[str, dict],
                 templates: dict[str, str], filters, progress) -> list[dict]:
    """Step 3 (text reasoning model), parsing and filtering for one shard's rows."""
    todo = [it for it in items if described[it.id]["description"] is not None or described[it.id].get("text_only")]
    outputs = generator.generate([
        Request(f"{it.id}/reasoning", "reasoning", reasoning_prompt(it, described[it.id], templates), (), it.meta)
        for it in todo], progress)
    by_id: dict[str, Completion] = {it.id: out for it, out in zip(todo, outputs)}
    return [verdict(it, by_id.get(it.id), described[it.id], filters) for it in items]


def reasoning_prompt(item: BridgeExample, described: dict, templates: dict[str, str]) -> str:
    if described.get("text_only"):
        return prompts.render(prompts.TEXT_ONLY_REASONING, question=item.question)
    return prompts.render(templates["reasoning"], description=described["description"], question=item.question)


def verdict(item: BridgeExample, output: Completion | None, described: dict, filters) -> dict:
    """One sample's outcome: kept with its target text, or the reason it was dropped.

    A failed generation keeps ``retryable`` (and ``failed_in``, the phase whose teacher
    failed), so the next run asks again; a truncated one is dropped for good.
    """
    if output is None:
        return {"id": item.id, "status": "generation_failed", "error": described.get("error") or "unknown",
                "failed_in": "multimodal",
                "retryable": bool(described.get("retryable"))}
    if output.text is None:
        return {"id": item.id, "status": "generation_failed", "error": output.error or "unknown",
                "failed_in": "reasoning", "retryable": output.retryable}
    if output.truncated:  # cut mid-thought: its last \boxed{} is not its conclusion
        return {"id": item.id, "status": "truncated", "error": "truncated", "failed_in": "reasoning",
                "retryable": False}
    parsed = parse_reasoning(output.text, output.reasoning)
    reason = filter_reason(parsed, item.answer, filters)
    row = {"id": item.id, "status": reason or "kept", "final_answer": parsed.answer,
           "reasoning_chars": len(parsed.reasoning), "reasoning_words": len(parsed.reasoning.split())}
    if reason is None:
        row["response"] = build_sample(parsed)
        row["reflection"] = reflection_counts(parsed.reasoning)
    return row


def pending(row: dict | None) -> bool:
    """Whether a row still needs its phase's work: never done, or failed for the teacher."""
    return row is None or bool(row.get("retryable"))


# --- the stage -----------------------------------------------------------------------------


def bridge_stage(config: BridgeStageConfig, work: Path, metrics: StageMetrics) -> dict[str, Any]:
    store = open_stage_store(config.output_uri, config.storage)
    if store.is_committed(DATASET):
        log.info("%s/%s is already committed; nothing to do", store.uri, DATASET)
        return summary(json.loads(store.open_file(DATASET, "stats.json")), f"{store.uri}/{DATASET}")
    settings = config.bridge
    templates = prompts.templates(settings.prompts)
    source = read_source(config, work / "cache")
    if not source.items:
        raise NothingKept(f"{config.source.source}: no usable rows (read {source.rows_read}, "
                          f"skipped {dict(sorted(source.skipped.items()))}); nothing to bridge")
    items, duplicates = dedupe(source.items) if settings.filters.dedupe else (source.items, 0)
    plan = load_or_save_plan(store, shard_plan([it.id for it in items], settings.shards, settings.shard_size))
    by_id = {it.id: it for it in items}
    metrics.set(samples_total=len(items), shards_total=len(plan))
    metrics.event("start", samples=len(items), shards=len(plan), duplicates=duplicates,
                  source_skipped=dict(source.skipped), attempt=config.attempt)
    run_phase(config, store, plan, by_id, "multimodal", templates, work, metrics)
    run_phase(config, store, plan, by_id, "reasoning", templates, work, metrics)
    return commit_dataset(config, store, plan, by_id, source, duplicates, work, metrics)


def run_phase(config, store, plan, by_id, role: str, templates, work: Path, metrics: StageMetrics) -> None:
    """Phase 1 (``multimodal``: steps 1-2) or 2 (``reasoning``: step 3) over the rows not done.

    A shard is done when committed with no pending rows; a committed shard with pending
    rows (its teacher failed there) has only those asked again, and is committed anew.
    """
    from tqdm import tqdm

    name = describe_name if role == "multimodal" else reason_name
    previous = {k: committed_rows(store, name(k)) for k in range(len(plan))}
    todo = {k: [i for i in plan[k] if pending(previous[k].get(i))] for k in range(len(plan))}
    todo = {k: ids for k, ids in todo.items() if ids}
    if not todo:
        return
    spec = config.bridge.multimodal_model if role == "multimodal" else config.bridge.reasoning_model
    generator = make_generator(spec, GeneratorContext(role, config.bridge.seed, config.storage, work))
    # Metric steps count finished work units: phase 1 shards, then phase 2 shards.
    progress = PhaseProgress(role, len(plan) - len(todo), 0 if role == "multimodal" else len(plan),
                             done_verdicts(store, plan) if role == "reasoning" else None)
    bar = tqdm(total=(2 if role == "multimodal" else 1) * sum(len(ids) for ids in todo.values()),
               desc=f"bridge {role}", unit="req", mininterval=10, disable=None)
    try:
        for k, ids in todo.items():
            if stop_requested():
                raise StageStopped({"stopped_at": f"{role} shard {k}"})
            started = time.monotonic()
            items = [by_id[i] for i in ids]
            if role == "multimodal":
                fresh = describe_shard(generator, items, templates, bar.update)
            else:
                described = committed_rows(store, describe_name(k))
                fresh = reason_shard(generator, items, described, templates, config.bridge.filters, bar.update)
            try:
                check_not_all_failed(fresh, role, k)
            except NothingKept as exc:
                raise NothingKept(f"{exc} (teacher {teacher_name(spec)})") from None
            merged = {**previous[k], **{r["id"]: r for r in fresh}}
            rows = [merged[i] for i in plan[k]]
            commit_rows(store, name(k), rows, work)  # the successes are kept even if we stop now
            progress.shard_done(metrics, fresh, [previous[k][r["id"]] for r in fresh if r["id"] in previous[k]],
                                time.monotonic() - started)
            previous[k] = merged
            log.info("%s shard %d/%d: %d rows asked", role, k + 1, len(plan), len(fresh))
            if generator.outage():
                raise TeacherFailed(f"the {role} teacher {teacher_name(spec)} is down ({generator.outage()}); "
                                    f"{role} shard {k} was committed with its failed rows pending, which "
                                    "the next run asks again")
    finally:
        bar.close()
        metrics.event("generator", role=role, **generator.describe())
        generator.close()
    check_failure_rate([r for k in range(len(plan)) for r in previous[k].values()], role, spec,
                       config.bridge.max_failure_rate)


def committed_rows(store, name: str) -> dict[str, dict]:
    return {r["id"]: r for r in read_rows(store, name)} if store.is_committed(name) else {}


def teacher_name(spec) -> str:
    """The teacher as a reader finds it: the endpoint (redacted) and model, or backend and model."""
    from ..redact import redact

    if spec.backend == "openai":
        return f"{redact(spec.endpoint)} (model {spec.model})"
    return f"{spec.backend}:{spec.model}" if spec.model else spec.backend


def phase_failures(rows: list[dict], role: str) -> list[str]:
    """The errors of the rows whose ``role`` teacher failed (pending for the next run)."""
    if role == "multimodal":
        return [r.get("error") or "unknown" for r in rows if r.get("retryable")]
    return [r.get("error") or "unknown" for r in rows if r.get("retryable") and r.get("failed_in") == "reasoning"]


def check_failure_rate(rows: list[dict], role: str, spec, bound: float) -> None:
    """Raise ``TeacherFailed`` when more than ``bound`` of a phase's rows failed at the teacher."""
    errors = phase_failures(rows, role)
    if rows and len(errors) / len(rows) > bound:
        counts = dict(collections.Counter(errors).most_common(5))
        raise TeacherFailed(
            f"{len(errors)} of {len(rows)} {role} requests to {teacher_name(spec)} failed ({counts}), above "
            f"maxFailureRate {bound}; the rows are committed as pending and the next run asks again")


def check_not_all_failed(rows: list[dict], role: str, shard: int) -> None:
    """Raise ``NothingKept`` when every request of a shard failed (an endpoint that is down,
    a wrong key): the shard is not committed, so a retry of the stage asks again."""
    if role == "multimodal":
        rows = [r for r in rows if not r.get("text_only")]
        errors = [r.get("error") for r in rows if r["description"] is None]
    else:  # the rows the reasoning model was asked for
        rows = [r for r in rows if r.get("failed_in") != "multimodal"]
        errors = [r.get("error") for r in rows if r["status"] == "generation_failed"]
    if rows and len(errors) == len(rows):
        counts = dict(collections.Counter(e or "unknown" for e in errors).most_common())
        raise NothingKept(f"every {role} request of shard {shard} failed ({counts}); the shard is "
                          "not committed, so a retry asks again")


def done_verdicts(store, plan) -> collections.Counter:
    """Verdicts (kept / drop reason) of the reasoning shards committed before this attempt."""
    totals: collections.Counter = collections.Counter()
    for k in range(len(plan)):
        if store.is_committed(reason_name(k)):
            totals.update(r["status"] for r in read_rows(store, reason_name(k)))
    return totals


class PhaseProgress:
    """Running totals of a phase, exported after every shard: throughput, kept, drops by reason."""

    def __init__(self, role: str, shards_done: int, step_offset: int, verdicts: collections.Counter | None):
        self.role, self.shards_done, self.step_offset, self.verdicts = role, shards_done, step_offset, verdicts

    def shard_done(self, metrics: StageMetrics, rows: list[dict], replaced: list[dict], seconds: float) -> None:
        """``rows`` were just made; ``replaced`` are the earlier rows they take the place of."""
        self.shards_done += 1
        values: dict[str, float] = {"samples_per_second": len(rows) / max(seconds, 1e-9),
                                    f"{self.role}_shards_done": self.shards_done}
        if self.verdicts is not None:
            self.verdicts.subtract(r["status"] for r in replaced)
            self.verdicts.update(r["status"] for r in rows)
            values["kept"] = self.verdicts.get("kept", 0)
            values["samples_done"] = sum(self.verdicts.values())
            values.update({f"dropped_{reason}": self.verdicts.get(reason, 0) for reason in DROP_REASONS[1:]})
        metrics.log(self.step_offset + self.shards_done, values)


def commit_rows(store, name: str, rows: list[dict], work: Path) -> str:
    staging = work / "staging" / name.replace("/", "_")
    shutil.rmtree(staging, ignore_errors=True)
    write_rows(rows, staging / ROWS)
    try:
        return store.commit_dir(staging, name, {"rows": len(rows)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_rows(store, name: str) -> list[dict]:
    return [json.loads(line) for line in store.open_file(name, ROWS).decode().splitlines() if line]


def commit_dataset(config, store, plan, by_id, source, duplicates: int, work: Path, metrics) -> dict[str, Any]:
    """Gather every shard's kept samples with their images; commit ``dataset`` with stats."""
    staging = work / "staging" / DATASET
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    out_rows, kept, dropped = [], [], collections.Counter({"duplicate": duplicates})
    for k in range(len(plan)):
        for row in read_rows(store, reason_name(k)):
            if row["status"] != "kept":
                dropped[row["status"]] += 1
                continue
            item = by_id[row["id"]]
            images = [copy_image(p, staging) for p in item.image_paths]
            extra = {key: item.meta[key] for key in ("task",) if key in item.meta}
            out_rows.append(cold_row(item.id, item.question, row["response"], images,
                                     answer=item.answer, **extra))
            kept.append(row)
    if not out_rows:
        raise NothingKept(f"kept 0 of {len(by_id) + duplicates} samples (dropped {dict(sorted(dropped.items()))}, "
                          f"source rows skipped {dict(sorted(source.skipped.items()))}); no data set committed")
    write_rows(out_rows, staging / "data.jsonl")
    stats = dataset_stats(
        kept, samples_in=len(by_id) + duplicates, dropped=dict(dropped), source=source.summary(),
        generators={"multimodal": spec_info(config.bridge.multimodal_model),
                    "reasoning": spec_info(config.bridge.reasoning_model)},
        settings={"shards": len(plan), "filters": config.bridge.filters.to_json_dict(),
                  "prompts": {k: "custom" if getattr(config.bridge.prompts, k) else "paper"
                              for k in prompts.DEFAULTS}},
    )
    (staging / "stats.json").write_text(json.dumps(stats, indent=2))
    uri = store.commit_dir(staging, DATASET, {"format": "vision-r1-cold", "rows": len(out_rows),
                                              "teacher": stats["teacher"]})
    shutil.rmtree(staging, ignore_errors=True)
    metrics.event("committed", uri=uri, kept=len(out_rows))
    result = summary(stats, uri)
    store.put_json("summary.json", result)
    log.info("committed %s: kept %d of %d, dropped %s", uri, stats["kept"], stats["samples_in"], stats["dropped"])
    return result


def copy_image(path: str, staging: Path) -> str:
    """Copy an image into the data set under its content hash; its path inside the set."""
    data = Path(path).read_bytes()
    suffix = Path(path).suffix if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp") else ".png"
    rel = f"images/{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not (staging / rel).exists():
        (staging / rel).write_bytes(data)
    return rel


def spec_info(spec) -> dict[str, Any]:
    if spec.backend == "rule":
        return {"backend": "rule", "teacher": "rule-based (synthetic tasks only)"}
    info = {"backend": spec.backend, "model": spec.model, "max_tokens": spec.max_tokens,
            "temperature": spec.temperature, "top_p": spec.top_p}
    if spec.backend == "openai":
        info["endpoint"] = spec.endpoint
    if spec.backend == "vllm":
        info["tensor_parallel_size"] = spec.tensor_parallel_size
    return info


def summary(stats: dict[str, Any], uri: str) -> dict[str, Any]:
    """The compact exit summary of the stage."""
    return {
        "samplesIn": stats["samples_in"],
        "kept": stats["kept"],
        "dropped": stats["dropped"],
        "teacher": stats["teacher"],
        "reflectionPerSample": stats["self_reflection"]["per_sample_mean"],
        "waitTotal": stats["self_reflection"].get("wait_total"),
        "waitPerSample": stats["self_reflection"].get("wait_per_sample"),
        "reasoningCharsMean": stats["reasoning_chars"].get("mean"),
        "artifactUri": uri,
    }
