"""`visionr1 eval`: score any checkpoints on benchmarks, outside a run.

    visionr1 eval --model [LABEL=]MODEL ... --benchmark NAME=FORMAT:SOURCE[@SPLIT] ...
                  [--backend hf|vllm] [--max-tokens N] [--max-retries N] [--temperature T]
                  [--limit N] [--judge-endpoint URL --judge-model NAME] [--output DIR]

MODEL is a saved model directory, a hub id, or a stage's output URI (its committed
``model`` artifact): the base model, the SFT model and each PTST stage can be scored
side by side. It builds the eval stage's config (the same schema the operator renders)
and runs the same entrypoint, ``python -m visionr1_trainer eval --config FILE``, as a
subprocess, then prints the accuracy table. Results land in ``--output`` (``results/``
with every sample's record). Exit status: 0 scored, 1 bad input or the stage failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

FORMATS = ("mathvista", "mathverse", "mmmath", "dynamath", "synthetic")
# The stage's label rule (visionr1_trainer.eval.stage.LABEL), checked here for a clear message.
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LABELLED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,62})=(.+)$")
EXIT_STOPPED = 143


class UsageError(Exception):
    """Bad command-line input; the message names the option."""


def _errors(lines) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for line in lines:
        err.print(f"error: {line}", markup=False)
    return 1


def _source(value: str, option: str) -> str:
    """A model/data source: a local path made absolute (it must exist), else a URI or hub id."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise UsageError(f"{option}: {value}: no such file or directory")
    return value  # a hub id (org/name)


def parse_models(values: list[str]) -> dict[str, str]:
    """``[LABEL=]MODEL`` options -> {label: source}; an unlabelled one is named after its last part."""
    models: dict[str, str] = {}
    for value in values:
        match = _LABELLED.match(value)
        if match is None and "=" in value.split("://")[0]:
            raise UsageError(f"--model {value!r}: a label must match {LABEL.pattern}")
        label, source = match.groups() if match else (None, value)
        source = _source(source, "--model")
        if label is None:
            label = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]).strip("-._") or "model"
        if label in models:
            raise UsageError(f"--model: label {label!r} is given twice; name them with LABEL=MODEL")
        models[label] = source
    return models


def parse_benchmarks(values: list[str], limit: int | None) -> list[dict]:
    """``NAME=FORMAT:SOURCE[@SPLIT]`` options -> BenchmarkSpec documents."""
    out = []
    for value in values:
        name, eq, rest = value.partition("=")
        fmt, colon, source = rest.partition(":")
        if not (eq and colon and name and source):
            raise UsageError(f"--benchmark: expected NAME=FORMAT:SOURCE[@SPLIT], got {value!r}")
        if fmt not in FORMATS:
            raise UsageError(f"--benchmark {name}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        split = None
        if "@" in source.rsplit("/", 1)[-1]:
            source, split = source.rsplit("@", 1)
        data: dict = {"source": _source(source, f"--benchmark {name}")}
        if split:
            data["split"] = split
        if limit:
            data["limit"] = limit
        out.append({"name": name, "format": fmt, "data": data})
    return out


def build_config(args: argparse.Namespace, output: Path) -> dict:
    """The eval stage config document (camelCase, as the operator renders it)."""
    if not args.model:
        raise UsageError("--model is required (at least one)")
    if not args.benchmark:
        raise UsageError("--benchmark is required (at least one)")
    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise UsageError("--judge-endpoint and --judge-model go together")
    models = parse_models(args.model)
    settings = {"backend": args.backend, "maxTokens": args.max_tokens, "maxRetries": args.max_retries,
                "temperature": args.temperature, "topP": args.top_p}
    if args.judge_endpoint:
        # The key is read by the stage from VISIONR1_JUDGE_API_KEY, never from the command line.
        settings["judge"] = {"endpoint": args.judge_endpoint, "model": args.judge_model}
    return {
        "kind": "eval", "run": "visionr1-eval", "stage": "eval",
        "outputUri": f"file://{output}", "storage": {"uri": f"file://{output}"},
        "model": {"name": next(iter(models.values())), "dtype": args.dtype},
        "metricsPort": 0, "terminationMessagePath": str(output / "termination.json"),
        "models": models, "benchmarks": parse_benchmarks(args.benchmark, args.limit), "eval": settings,
    }


def _validate(document: dict) -> list[str]:
    from pydantic import ValidationError

    from visionr1_trainer.config import WIRE, EvalStageConfig, format_errors

    try:
        EvalStageConfig.model_validate(document, **WIRE)
    except ValidationError as exc:
        return [f"{path}: {message}" for path, message in format_errors(exc)]
    return []


def print_results(console: Console, output: Path) -> None:
    summary = json.loads((output / "results" / "summary.json").read_text())
    table = Table(title=f"eval results ({output / 'results'})", title_justify="left")
    for column in ("benchmark", "model", "accuracy", "judged", "n", "format fail", "mean tokens", "retries"):
        table.add_column(column, justify="left" if column in ("benchmark", "model") else "right")

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for bench, by_label in summary["benchmarks"].items():
        for label, s in by_label.items():
            table.add_row(bench, label, pct(s.get("accuracy")), pct(s.get("judgedAccuracy")), str(s.get("n")),
                          pct(s.get("formatFailureRate")), str(s.get("reasoningLengthMean")), str(s.get("retries")))
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser().resolve()
    try:
        document = build_config(args, output)
    except UsageError as exc:
        return _errors([str(exc)])
    problems = _validate(document)
    if problems:
        return _errors(problems)
    output.mkdir(parents=True, exist_ok=True)
    config_path = output / "eval-config.json"
    config_path.write_text(json.dumps(document, indent=2))
    # The stage logs to stderr as it goes; its JSON summary lands in the termination file.
    code = subprocess.run([sys.executable, "-m", "visionr1_trainer", "eval", "--config", str(config_path)]).returncode
    if code != 0:
        try:
            detail = json.loads((output / "termination.json").read_text()).get("error")
        except (OSError, ValueError):
            detail = None
        if code == EXIT_STOPPED:
            return _errors([f"eval stopped; run the same command again to resume ({output})"])
        return _errors([f"eval failed (exit status {code}): {detail or 'see the log above'}"])
    print_results(Console(highlight=False, width=max(120, Console().width)), output)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="score models on benchmarks (MathVista, MathVerse, MM-Math, DynaMath)",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]MODEL",
                   help="a model dir, hub id or stage output URI; repeat to compare")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FORMAT:SOURCE[@SPLIT]",
                   help=f"FORMAT is one of {', '.join(FORMATS)}; SOURCE a hub name, path or s3:// URI")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (CPU or GPU) or vllm (GPU)")
    p.add_argument("--max-tokens", type=int, default=16000, help="new tokens per sample (paper: 16000)")
    p.add_argument("--max-retries", type=int, default=2, help="resamples of a completion lacking </answer>")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--limit", type=int, default=None, help="score at most N rows of each benchmark")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    p.add_argument("--judge-endpoint", help="OpenAI-compatible base URL; key from VISIONR1_JUDGE_API_KEY")
    p.add_argument("--judge-model", help="the judge's model name")
    p.add_argument("--output", default="visionr1-eval", help="results directory (default ./visionr1-eval)")
    p.set_defaults(func=cmd_eval)
