"""The eval stage: score every model on every benchmark, resumably, and report.

``python -m visionr1_trainer eval --config stage.json`` runs ``run(config)``. The work is
split into units, one per (benchmark, model label). Models are taken one at a time (each
loaded once); for each of its units the stage samples a completion per item (retrying
ones without ``</answer>``), scores them by rules (and by the judge, if one is set), and
commits the unit's records and scores as the artifact ``units/<benchmark>-<label>``. A
restarted stage skips committed units, and a stop request (SIGTERM) is honoured between
units and sampling batches, so at most the unit in flight is redone.

At the end it commits the artifact ``results``:

    summary.json                        per benchmark and label: accuracy (rules),
                                        judgedAccuracy (when a judge ran), n,
                                        formatFailureRate, reasoningLengthMean (tokens),
                                        retries, categories {name: {accuracy, n}}, ...
    records-<benchmark>-<label>.jsonl   every sample: id, prompt, completion, extracted,
                                        ground_truth, correct, judged, categories, attempts...

writes the compact summary (accuracy and n per benchmark and label, the results URI) to
``<output>/summary.json`` and returns it: it becomes the termination message, and so
``status.eval`` of the run. Each unit's scores are also Prometheus gauges
(``visionr1_eval_<benchmark>_<label>_accuracy``...), ``visionr1_step`` counts finished
units out of ``visionr1_total_steps``.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointManager, resolve_model_dir
from ..config import BenchmarkSpec, EvalSettings, EvalStageConfig
from ..metrics import METRICS_LOG, StageMetrics
from ..runtime import TERMINATION_MESSAGE_LIMIT, StageStopped, UnusableSetting, stop_requested, work_dir
from .benchmarks import EvalItem, load_benchmark
from .judge import Judge
from .sampling import Sampler, SamplingSettings, make_sampler, prompt_text, sample_with_retries
from .scoring import score, summarize

log = logging.getLogger("visionr1.eval")

RESULTS = "results"
UNITS = "units"
BASE = "base"  # the label value that means the run's own model (spec.model)
# A model label names files, artifacts and metric series.
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SCORING_THREADS = 4
# Room left in the termination message for the stage name, attempt and JSON framing.
COMPACT_LIMIT = TERMINATION_MESSAGE_LIMIT - 512
# What the cold-start data teaches (``data.formats.RESPONSE_TEMPLATE``), said in words, for
# models that never learned it (``eval.formatInstructionFor``).
FORMAT_INSTRUCTION = ("First think through the problem step by step inside <think> </think>, then give the final "
                      "answer inside <answer> </answer>, written as: <answer> Final Answer: your answer </answer>")
# Of a failed benchmark's error in the status summary, and of the stage's error message:
# with COMPACT_LIMIT the termination message stays under Kubernetes' 4096 bytes.
ERROR_CHARS = 300


class BenchmarksFailed(Exception):
    """Some benchmarks could not be read or scored; the others were. ``summary`` is the
    stage's compact summary (every score, each failed benchmark's error): the
    termination message carries it, so status shows the scores beside the failure."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class BenchmarksUnusable(BenchmarksFailed, UnusableSetting):
    """Every failed benchmark names data that is not there (a split or subset matching no
    file): retrying cannot help, so the stage exits 2."""


@dataclass(frozen=True)
class Unit:
    """Scoring one model (``label``) on one benchmark: the resumable piece of work."""

    benchmark: BenchmarkSpec
    label: str

    @property
    def name(self) -> str:
        return f"{self.benchmark.name}-{self.label}"

    @property
    def artifact(self) -> str:
        return f"{UNITS}/{self.name}"

    @property
    def records_file(self) -> str:
        return f"records-{self.name}.jsonl"

    @property
    def submission_file(self) -> str:
        """The predictions in the benchmark's submission format (``predictionsOnly``)."""
        return f"submission-{self.name}.json"


def submission(fmt: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A predictions file as the benchmark's scorer reads one: ``{pid: {the problem's fields,
    "response", "extraction"}}`` (MathVista's ``output_*.json``, which its test server and
    ``calculate_score.py`` take). A multiple-choice extraction is the chosen option's text.
    Other formats get the same layout with their own ids."""
    out: dict[str, Any] = {}
    for record in records:
        problem = dict(record.get("problem") or {})
        extraction = record.get("extracted")
        choices = record.get("choices") or problem.get("choices")
        if extraction and choices and len(extraction) == 1 and "A" <= extraction <= "Z" \
                and ord(extraction) - ord("A") < len(choices):
            extraction = choices[ord(extraction) - ord("A")]
        key = str(problem.get("pid") or record["id"])
        if fmt == "mathvista":
            problem.pop("answer", None)  # withheld on test; the server holds it
        out[key] = {**problem, "response": record.get("completion") or "", "extraction": extraction or ""}
    return out


def plan_units(config: EvalStageConfig) -> list[Unit]:
    """Every (benchmark, label) pair, model-major; bad labels and names are ValueErrors."""
    problems = [f"models.{label}: a label must match {LABEL.pattern}"
                for label in config.models if not LABEL.match(label)]
    names = [b.name for b in config.benchmarks]
    problems += [f"benchmarks: {name!r} is listed twice" for name in sorted({n for n in names if names.count(n) > 1})]
    wanted = config.eval.benchmarks
    problems += [f"eval.benchmarks: {name!r} is not in benchmarks ({', '.join(names)})"
                 for name in wanted if name not in names]
    problems += [f"eval.formatInstructionFor: {label!r} is not a model label ({', '.join(config.models)})"
                 for label in config.eval.format_instruction_for if label not in config.models]
    chosen = [b for b in config.benchmarks if not wanted or b.name in wanted]
    units = [Unit(b, label) for label in config.models for b in chosen]
    seen: dict[str, Unit] = {}
    for unit in units:
        if unit.name in seen:
            problems.append(f"models: {unit.label!r} on {unit.benchmark.name!r} and {seen[unit.name].label!r} on "
                            f"{seen[unit.name].benchmark.name!r} would share the name {unit.name!r}; rename a label")
        seen[unit.name] = unit
    if problems:
        raise ValueError("; ".join(problems))
    return units


def run(config: EvalStageConfig) -> dict[str, Any]:
    work = work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    with StageMetrics(config.run, config.stage, config.metrics_port, work / METRICS_LOG) as metrics:
        return evaluate(config, work, metrics)


# --- one unit ---------------------------------------------------------------------------------


def unit_seed(unit: Unit) -> int:
    """The same seed for every model on a benchmark: side-by-side scores share their draws."""
    return zlib.crc32(unit.benchmark.name.encode()) % 1_000_000


def with_format_instruction(items: list[EvalItem]) -> list[EvalItem]:
    """The items with ``FORMAT_INSTRUCTION`` after each prompt (``eval.formatInstructionFor``)."""
    return [replace(item, question=f"{item.question.rstrip()}\n\n{FORMAT_INSTRUCTION}") for item in items]


def evaluate_unit(items: list[EvalItem], sampler: Sampler, settings: EvalSettings, judge: Judge | None,
                  seed: int, predictions_only: bool = False) -> list[dict[str, Any]]:
    """Sample, score (rules, then the judge) and record every item of one unit.

    ``predictions_only``: the answers are withheld; no judge runs and ``correct`` is False.
    """
    if predictions_only:
        judge = None
    # Greedy decoding would only repeat itself: retries need sampling.
    retries = settings.max_retries if settings.temperature > 0 else 0
    samples, attempts = sample_with_retries(sampler.generate, items, retries, seed)
    texts = [s.text for s in samples]
    # math-verify runs in worker processes; threads keep a few of them busy at once.
    with ThreadPoolExecutor(max_workers=SCORING_THREADS, thread_name_prefix="eval-score") as pool:
        verdicts = list(pool.map(score, items, texts))
    judged = judge.verdicts(items, texts) if judge is not None else [None] * len(items)
    return [
        {
            "id": item.id,
            "prompt": prompt_text(item),
            "completion": sample.text,
            "extracted": verdict.extracted,
            "ground_truth": item.answer,
            "choices": item.choices,
            "answer_type": item.answer_type,
            "correct": verdict.correct,
            "judged": judgment,
            "format_ok": verdict.format_ok,
            "timed_out": verdict.timed_out,
            "attempts": tries,
            "tokens": sample.tokens,
            "truncated": sample.truncated,
            "error": sample.error,
            "categories": item.categories,
            "group": item.group,
            **({"problem": item.problem} if predictions_only and item.problem is not None else {}),
        }
        for item, sample, tries, verdict, judgment in zip(items, samples, attempts, verdicts, judged)
    ]


def commit_unit(ckpt: CheckpointManager, unit: Unit, records: list[dict], summary: dict) -> str:
    def write(directory: Path) -> None:
        with (directory / "records.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (directory / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))

    return ckpt.commit(unit.artifact, write, {"benchmark": unit.benchmark.name, "label": unit.label,
                                              "n": summary["n"], "accuracy": summary.get("accuracy")})


def metric_values(unit: Unit, summary: dict) -> dict[str, float]:
    """Gauges of one unit: ``eval_<benchmark>_<label>_<score>`` in snake_case."""
    prefix = "eval_" + re.sub(r"[^a-z0-9]+", "_", f"{unit.benchmark.name}_{unit.label}".lower()).strip("_")
    keys = {"accuracy": "accuracy", "judgedAccuracy": "judged_accuracy", "n": "samples",
            "formatFailureRate": "format_failure_rate", "reasoningLengthMean": "reasoning_length_mean",
            "retries": "retries", "worstCaseAccuracy": "worst_case_accuracy"}
    return {f"{prefix}_{name}": summary[key] for key, name in keys.items() if summary.get(key) is not None}


# --- the stage --------------------------------------------------------------------------------


class Benchmarks:
    """Benchmark items, read on first use (a fully resumed stage reads none)."""

    def __init__(self, config: EvalStageConfig):
        self.config = config
        self._loaded: dict[str, tuple[list[EvalItem], dict] | Exception] = {}

    def get(self, spec: BenchmarkSpec) -> tuple[list[EvalItem], dict]:
        """``(items, what was read: source, rows, kept, skipped by reason)``; a benchmark that
        cannot be read raises the same error for every model (it is read once)."""
        if spec.name not in self._loaded:
            try:
                result = load_benchmark(spec, self.config.storage)
                if not result.items:
                    hint = (" (for a split whose answers are withheld, such as MathVista test, set "
                            "predictionsOnly: true)" if result.skipped.get("empty_answer") else "")
                    raise RuntimeError(f"no usable rows{hint} in {spec.data.source} (read {result.rows_read}, "
                                       f"skipped {dict(result.skipped)})")
                self._loaded[spec.name] = (result.items, result.summary())
            except StageStopped:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the other benchmarks go on
                self._loaded[spec.name] = exc
        loaded = self._loaded[spec.name]
        if isinstance(loaded, Exception):
            raise loaded
        return loaded


def load_sampler(config: EvalStageConfig, label: str, work: Path) -> tuple[Sampler, str]:
    """The sampler for one model label, and the model directory (or hub id) it loaded."""
    source = config.models[label]
    is_base = source == BASE
    model_dir = resolve_model_dir(config.model.name if is_base else source, config.storage, work)
    processor_dir = model_dir
    if is_base and config.model.processor:
        processor_dir = resolve_model_dir(config.model.processor, config.storage, work)
    settings = SamplingSettings(config.eval.max_tokens, config.eval.temperature, config.eval.top_p)
    log.info("model %s: %s (backend %s)", label, model_dir, config.eval.backend)
    return make_sampler(config.eval.backend, model_dir, processor_dir, config.model, settings), model_dir


def evaluate(config: EvalStageConfig, work: Path, metrics: StageMetrics) -> dict[str, Any]:
    units = plan_units(config)
    ckpt = CheckpointManager(config.output_uri, config.storage, work)
    benchmarks = Benchmarks(config)
    judge = Judge(config.eval.judge) if config.eval.judge is not None else None
    scores: dict[str, dict] = {}
    retryable: set[str] = set()  # failed units a retry might fix (not a missing split)
    metrics.set(total_steps=len(units))
    metrics.event("start", units=[u.name for u in units], attempt=config.attempt, backend=config.eval.backend)
    for label in config.models:
        todo = []
        for unit in (u for u in units if u.label == label):
            if ckpt.store.is_committed(unit.artifact):  # done by an earlier attempt
                scores[unit.name] = json.loads(ckpt.store.open_file(unit.artifact, "summary.json"))
                metrics.log(len(scores), metric_values(unit, scores[unit.name]))
                log.info("%s: committed earlier (accuracy %s), skipped", unit.name, scores[unit.name].get("accuracy"))
            else:
                todo.append(unit)
        if todo:
            _check_stop(scores, units)
            sampler, model_dir = load_sampler(config, label, work)
            try:
                for unit in todo:
                    _check_stop(scores, units)
                    try:
                        scores[unit.name] = run_unit(config, unit, sampler, benchmarks, judge, ckpt, model_dir)
                    except (StageStopped, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # noqa: BLE001 - a benchmark fails alone
                        message = f"{type(exc).__name__}: {exc}"
                        log.error("%s: failed, the other benchmarks go on: %s", unit.name, message)
                        metrics.event("unit_failed", unit=unit.name, error=message[:1000])
                        scores[unit.name] = {"error": message[:2000], "n": 0}
                        if not isinstance(exc, UnusableSetting):
                            retryable.add(unit.name)
                        continue
                    metrics.log(len(scores), metric_values(unit, scores[unit.name]))
            finally:
                sampler.close()
    uri = commit_results(config, ckpt, units, scores, judge)
    compact = compact_summary(units, scores, uri)
    ckpt.store.put_json("summary.json", compact)
    metrics.event("end", results=uri)
    failed = sorted({u.benchmark.name for u in units if scores[u.name].get("error")})
    if failed:
        first = next(scores[u.name]["error"] for u in units if scores[u.name].get("error"))
        error = BenchmarksFailed if retryable else BenchmarksUnusable
        raise error(f"benchmark(s) {', '.join(failed)} failed, the others are scored: "
                    f"{first}"[:ERROR_CHARS], compact)
    return compact


def run_unit(config: EvalStageConfig, unit: Unit, sampler: Sampler, benchmarks: Benchmarks, judge: Judge | None,
             ckpt: CheckpointManager, model_dir: str) -> dict:
    items, read = benchmarks.get(unit.benchmark)
    if unit.label in config.eval.format_instruction_for:
        items = with_format_instruction(items)
    predictions_only = unit.benchmark.predictions_only
    log.info("%s: %s %d items", unit.name, "predicting" if predictions_only else "scoring", len(items))
    records = evaluate_unit(items, sampler, config.eval, judge, unit_seed(unit), predictions_only)
    summary = summarize(records, judge_ran=judge is not None and not predictions_only)
    if predictions_only:  # nothing to score against: only the answered and format rates mean anything
        summary = {k: v for k, v in summary.items() if k not in ("accuracy", "correct", "judgedAccuracy",
                                                                   "worstCaseAccuracy", "questions", "judgeFailures")}
        summary.update(predictionsOnly=True,
                       categories={name: {"n": c["n"]} for name, c in summary["categories"].items()})
    summary.update(data=read, model=model_dir)
    commit_unit(ckpt, unit, records, summary)
    log.info("%s: accuracy %s on %d (format failures %.3f, retries %d)", unit.name, summary.get("accuracy"),
             summary["n"], summary["formatFailureRate"], summary["retries"])
    return summary


def _check_stop(scores: dict[str, dict], units: list[Unit]) -> None:
    if stop_requested():
        raise StageStopped({"unitsDone": len(scores), "units": len(units)})


def commit_results(config: EvalStageConfig, ckpt: CheckpointManager, units: list[Unit], scores: dict[str, dict],
                   judge: Judge | None) -> str:
    """The ``results`` artifact: the full summary and every unit's records, side by side."""
    summary = {
        "benchmarks": _table(units, lambda unit: scores[unit.name]),
        "models": dict(config.models),
        "settings": config.eval.model_dump(mode="json", by_alias=True, exclude={"judge"}),
        "judge": judge.describe() if judge is not None else None,
    }

    def write(directory: Path) -> None:
        # Not key-sorted: benchmarks and models stay in the order the config gives them.
        (directory / "summary.json").write_text(json.dumps(summary, indent=1))
        for unit in units:
            if scores[unit.name].get("error"):
                continue  # failed: nothing was committed (a retry runs it again)
            records = ckpt.store.open_file(unit.artifact, "records.jsonl")
            (directory / unit.records_file).write_bytes(records)
            if unit.benchmark.predictions_only:
                lines = [json.loads(line) for line in records.decode("utf-8").splitlines() if line.strip()]
                (directory / unit.submission_file).write_text(
                    json.dumps(submission(unit.benchmark.format, lines), indent=1, ensure_ascii=False))

    return ckpt.commit(RESULTS, write, {"stage": config.stage, "units": len(units)})


def _table(units: list[Unit], entry) -> dict[str, dict]:
    """``{benchmark: {label: entry(unit)}}`` in the units' order."""
    table: dict[str, dict] = {}
    for unit in units:
        table.setdefault(unit.benchmark.name, {})[unit.label] = entry(unit)
    return table


def compact_summary(units: list[Unit], scores: dict[str, dict], uri: str, limit: int = COMPACT_LIMIT) -> dict:
    """Accuracy and n per benchmark and label (status.eval), within ``limit`` bytes of JSON.

    When many benchmarks and models do not fit, the judged accuracy goes first, then the
    per-entry keys shrink to ``[accuracy, n]``; the full numbers are always in ``results``.
    """
    def build(form) -> dict:
        return {"benchmarks": _table(units, lambda unit: form(scores[unit.name])), "artifactUri": uri}

    # A failed benchmark has an error and no accuracy; a predictions-only one no accuracy.
    def failed(s: dict) -> dict | None:
        return {"error": s["error"][:ERROR_CHARS], "n": 0} if s.get("error") else None

    def keep(s: dict, keys: tuple[str, ...]) -> dict:
        return {k: s[k] for k in keys if s.get(k) is not None}

    forms = [
        lambda s: failed(s) or keep(s, ("accuracy", "judgedAccuracy", "worstCaseAccuracy", "n")),
        lambda s: failed(s) or keep(s, ("accuracy", "n")),
        lambda s: {"error": s["error"][:80]} if s.get("error") else [s.get("accuracy"), s["n"]],
    ]
    for form in forms:
        compact = build(form)
        if len(json.dumps(compact, separators=(",", ":"))) <= limit:
            return compact
    return {"artifactUri": uri, "units": len(units), "truncated": True,
            "message": "too many benchmarks x models for status; see the results artifact"}
