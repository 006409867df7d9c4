"""The figures of a finished run, per model: accuracy and how long it reasons.

Read from the eval stage's committed ``results`` artifact (``summary.json`` and the
per-sample ``records-<benchmark>-<label>.jsonl``), so they are what the stage scored,
not a re-run:

* ``accuracy``: share of held-out samples right (the rules' verdict), in 0..1;
* ``reasoning_tokens``: mean tokens inside ``<think>...</think>`` (a chain cut off by
  the token budget counts up to where it stops; no ``<think>``, 0), counted with the
  scored model's own tokenizer, the paper's "average reasoning length";
* ``completion_tokens``: mean completion length in tokens (what the sampler returned);
* ``clipped_ratio``: share of completions that hit the token budget;
* ``perception`` (multiple-choice records): share whose first claim of which shape is
  larger (``data.reflect.first_claim``) names the right option, whatever the final
  answer: what the model saw before its reflection; a completion with no claim counts
  as wrong (the ``largest`` task's measure; None for records without choices);
* ``standard_error``: of the accuracy, sqrt(p (1 - p) / n) (the held-out sample's noise);
* ``n``, ``format_failure_rate``.

``visionr1 report`` writes them as ``report/results.json`` (``{"models": {label:
{...}}}``, labels ``base``, ``sft``, ``ptst-1``, ...), the demo's figures and the
ablation's (bench/ablation.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


class ResultsError(Exception):
    """The run has no eval results to read."""


def reasoning_text(completion: str) -> str:
    """The text inside the first ``<think>`` block (up to the end if it never closes)."""
    match = _THINK.search(completion)
    return match.group(1) if match else ""


def _tokenizer(model_dir: str, cache: dict):
    if model_dir not in cache:
        from transformers import AutoTokenizer

        cache[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return cache[model_dir]


def perception(records: list[dict]) -> float | None:
    """Share of records whose first "larger" claim names the right option (see the docstring)."""
    from .data.reflect import first_claim

    if not records or not all(r.get("choices") for r in records):
        return None
    right = 0
    for r in records:
        letters = "ABCDEFGH"[:len(r["choices"])]
        truth = r.get("ground_truth")
        if truth in letters:
            right += first_claim(r.get("completion") or "") == r["choices"][letters.index(truth)]
    return round(right / len(records), 4)


def model_figures(records: list[dict], summary: dict, tokenizer) -> dict[str, Any]:
    """One (benchmark, model) unit's figures from its records and its summary."""
    n = len(records)
    if not n:
        raise ResultsError("no records")
    reasoning = [len(tokenizer(reasoning_text(r.get("completion") or ""), add_special_tokens=False)["input_ids"])
                 for r in records]
    accuracy = summary["accuracy"]
    return {
        "accuracy": round(accuracy, 4),
        "standard_error": round((accuracy * (1 - accuracy) / n) ** 0.5, 4),
        "reasoning_tokens": round(sum(reasoning) / n, 2),
        "completion_tokens": round(sum(r.get("tokens") or 0 for r in records) / n, 2),
        "clipped_ratio": round(sum(bool(r.get("truncated")) for r in records) / n, 4),
        "perception": perception(records),
        "n": n,
        "format_failure_rate": summary.get("formatFailureRate"),
    }


def run_results(run_dir: str | Path) -> dict[str, Any]:
    """``{"benchmark": first, "models": {label: figures}, "benchmarks": {name: {label: figures}}}``."""
    results = Path(run_dir) / "eval" / "results"
    try:
        summary = json.loads((results / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{results / 'summary.json'}: no eval results ({exc})") from None
    tokenizers: dict = {}
    table: dict[str, dict[str, Any]] = {}
    for bench, by_label in (summary.get("benchmarks") or {}).items():
        for label, unit in by_label.items():
            if unit.get("error") or unit.get("accuracy") is None:
                continue  # a benchmark that failed, or predictions only (MathVista test): nothing scored
            path = results / f"records-{bench}-{label}.jsonl"
            try:
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except (OSError, json.JSONDecodeError) as exc:
                raise ResultsError(f"{path}: unreadable eval records ({exc})") from None
            tokenizer = _tokenizer(unit["model"], tokenizers)
            table.setdefault(bench, {})[label] = model_figures(records, unit, tokenizer)
    if not table:
        raise ResultsError(f"{results / 'summary.json'}: no benchmark was scored")
    first = next(iter(table))
    return {"benchmark": first, "models": table[first], "benchmarks": table}


def paired_difference(records_a: list[dict], records_b: list[dict]) -> dict[str, float]:
    """Accuracy of b minus a on the same items, with the paired standard error.

    Both models answered the same held-out items, so the difference's noise is that of
    the per-item differences (d_i in {-1, 0, 1}): sqrt(var(d) / n).
    """
    a = {r["id"]: bool(r.get("correct")) for r in records_a}
    d = [int(bool(r.get("correct"))) - int(a[r["id"]]) for r in records_b if r["id"] in a]
    if not d:
        raise ResultsError("no items in common")
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return {"difference": round(mean, 4), "standard_error": round((var / len(d)) ** 0.5, 4), "n": len(d)}


def write_results(run_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.write_text(json.dumps(run_results(run_dir), indent=1) + "\n")
    return out
