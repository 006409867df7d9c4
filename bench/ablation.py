"""The paper's ablation (Vision-R1-Zero, -CI, -Long, Vision-R1, Fixed short, PTST 3-stage) at toy scale.

Each row is a manifest under ``examples/ablation/`` and runs through the ordinary
``visionr1 run``, on the ``largest`` task (``visionr1_trainer.data.reflect``: a tiny
Qwen2.5-VL, the rule teacher's reflective chains). For each seed the bench

1. renders the task's data and builds the tiny base model with that seed
   (``visionr1_trainer.demo.prepare``) under ``WORK/seed-N/inputs``;
2. runs ``ci`` first (bridge, cold-start SFT, eval): its SFT model is the Vision-R1-CI
   every cold-started RL row starts from, as in the paper;
3. runs the RL rows from it (``zero`` from the base model), each evaluated on the same
   held-out split;
4. reads each run's figures (``visionr1_trainer.results``) into ``--out``.

A row's manifest is rewritten only where the bench must: the run's name
(``ROW-sN``), the storage root, the input paths (``runs/default/tiny-cpu/inputs`` ->
this seed's), the CI model (``runs/default/ablation-ci/sft`` -> this seed's) and the
seeds of bridge, SFT and GRPO (= N). Everything else is the file as committed.

    .venv/bin/python bench/ablation.py [--rows NAME,...] [--seeds N] [--out FILE] [--work DIR]

Rows: zero, ci, long, ptst, fixed-short, ptst-3 (``--seeds N`` runs seeds 0..N-1). A
run of a subset merges into ``--out`` (other rows and seeds are kept), so a sweep cut
short keeps what finished; a row and seed already there is not run again unless
``--force``. ``--figure`` redraws docs/images/ablation.png from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "examples" / "ablation"
ROWS = ("zero", "ci", "long", "ptst", "fixed-short", "ptst-3")
FROM_CI = ("long", "ptst", "fixed-short", "ptst-3")  # start from the ci row's SFT model
# Per seed: ci first (the others start from it), zero last (its untrained model writes
# every rollout to the full budget: the dearest row, and the least informative).
RUN_ORDER = ("ci", "ptst", "long", "fixed-short", "ptst-3", "zero")
DEMO_INPUTS = "file://./runs/default/tiny-cpu/inputs"
CI_MODEL = "file://./runs/default/ablation-ci/sft"
DEFAULT_OUT = ROOT / "bench" / "results" / "ablation.json"
FIGURE = ROOT / "docs" / "images" / "ablation.png"
FIGURES = ("accuracy", "reasoning_tokens", "completion_tokens", "clipped_ratio", "perception")

# The paper's ablation (Vision-R1 paper, Tables 4 and 5): average reasoning length in
# tokens and average score over MathVista, MathVerse and MM-Math.
PAPER = {
    "zero": {"label": "Vision-R1-Zero", "reasoning_tokens": 1285, "score": 50.7},
    "ci": {"label": "Vision-R1-CI", "reasoning_tokens": 3566, "score": 44.5},
    "long": {"label": "Vision-R1-Long", "reasoning_tokens": 3107, "score": 47.7},
    "ptst": {"label": "Vision-R1 (PTST)", "reasoning_tokens": 2057, "score": 55.4},
    "fixed-short": {"label": "Fixed 4K", "reasoning_tokens": None, "score": 54.3},
    "ptst-3": {"label": "PTST 3-stage", "reasoning_tokens": None, "score": 55.1},
}


class BenchError(Exception):
    pass


def load_manifest(row: str) -> dict:
    path = MANIFESTS / f"{row}.yaml"
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"{path}: {exc}") from None


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, str):
        for old, new in mapping.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old):]
    return value


def seeded_manifest(row: str, seed: int, work: Path) -> dict:
    """The row's manifest for one seed (see the module's docstring for what changes)."""
    doc = load_manifest(row)
    inputs = work / f"seed-{seed}" / "inputs"
    runs = work / "runs"
    doc = _rewrite(doc, {
        DEMO_INPUTS: f"file://{inputs}",
        CI_MODEL: f"file://{runs}/default/ci-s{seed}/sft",
    })
    doc["metadata"]["name"] = f"{row}-s{seed}"
    doc["spec"]["storage"]["uri"] = f"file://{runs}"
    stages = doc["spec"]["stages"]
    for stage in ("bridge", "sft", "grpo"):
        if stages.get(stage, {}).get("enabled", True):
            stages.setdefault(stage, {})["seed"] = seed
    return doc


def visionr1_cli() -> str:
    local = Path(sys.executable).parent / "visionr1"
    found = str(local) if local.exists() else shutil.which("visionr1")
    if not found:
        raise BenchError("no `visionr1` command next to this Python or on PATH (pip install -e '.[operator,train]')")
    return found


def run_row(row: str, seed: int, work: Path, log) -> dict:
    from visionr1_trainer.results import run_results

    doc = seeded_manifest(row, seed, work)
    name = doc["metadata"]["name"]
    path = work / "manifests" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    run_dir = work / "runs" / "default" / name
    start = time.monotonic()
    with (work / "logs" / f"{name}.log").open("w") as out:
        code = subprocess.run([visionr1_cli(), "run", str(path)], stdout=out, stderr=subprocess.STDOUT,
                              cwd=work).returncode
    wall = round(time.monotonic() - start, 1)
    if code:
        raise BenchError(f"{name}: visionr1 run exited {code} after {wall} s (log: {work / 'logs' / (name + '.log')})")
    results = run_results(run_dir)
    label, figures = list(results["models"].items())[-1]  # the row's final model
    status = json.loads((run_dir / "status.json").read_text())
    training = {s["name"]: s.get("summary") for s in status.get("stages", []) if s.get("kind") == "grpo"}
    log(f"{name}: {label} accuracy {figures['accuracy']:.3f} reasoning {figures['reasoning_tokens']:.1f} "
        f"completion {figures['completion_tokens']:.1f} clipped {figures['clipped_ratio']:.3f} ({wall} s)")
    return {**figures, "label": label, "models": results["models"], "wall_seconds": wall, "training": training}


def aggregate(seeds: dict[str, dict]) -> dict:
    out = {}
    done = [s for s in seeds.values() if "accuracy" in s]
    for key in FIGURES:
        values = [s[key] for s in done if s.get(key) is not None]
        if values:
            out[key] = {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values),
                        "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    out["seeds_done"] = len(done)
    return out


def base_figures(data: dict) -> dict[str, dict]:
    """Per seed, the pretrained base model's figures (scored by the zero row, which starts from it)."""
    seeds = (data["rows"].get("zero") or {}).get("seeds") or {}
    return {seed: run["models"]["base"] for seed, run in seeds.items() if "base" in (run.get("models") or {})}


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"rows": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: not JSON ({exc}); move it away or give another --out") from None
    data.setdefault("rows", {})
    return data


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg())}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def sweep(rows: list[str], seeds: int, out: Path, work: Path, log=print, force: bool = False) -> dict:
    from visionr1_trainer.demo import prepare

    data = load_results(out)
    data.setdefault("runs", [])
    data["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
                         "seeds": seeds, "commit": commit(), "machine": machine(),
                         "command": " ".join(["bench/ablation.py", *sys.argv[1:]])})
    (work / "logs").mkdir(parents=True, exist_ok=True)
    failures = []
    order = [r for r in RUN_ORDER if r in rows]
    for seed in range(seeds):
        prepare(work / f"seed-{seed}" / "inputs", seed=seed)
        for row in order:
            if row in FROM_CI and not (work / "runs" / "default" / f"ci-s{seed}" / "sft").exists():
                failures.append(f"{row}-s{seed}: no ci-s{seed} SFT model (run the ci row first)")
                log(failures[-1])
                continue
            entry = data["rows"].setdefault(row, {"seeds": {}})
            if not force and "accuracy" in entry["seeds"].get(str(seed), {}):
                log(f"{row}-s{seed}: in {out.name} already (--force runs it again)")
                continue
            try:
                entry["seeds"][str(seed)] = run_row(row, seed, work, log)
            except Exception as exc:  # one failed row must not lose the others' results
                failures.append(str(exc))
                entry["seeds"][str(seed)] = {"error": str(exc)}
                log(f"FAILED {exc}")
            entry["summary"] = aggregate(entry["seeds"])
            entry["paper"] = PAPER[row]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1) + "\n")  # after every run: a cut sweep keeps it
    data["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data["runs"][-1]["failures"] = failures
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def _span(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}", unit: str = "") -> str:
    if not values:
        return ""
    v = [scale * x for x in values]
    return f"{fmt.format(statistics.fmean(v))}{unit} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def markdown_table(data: dict) -> str:
    lines = ["| row | paper: reasoning length | paper: avg score | seeds | accuracy mean (min-max) | "
             "reasoning tokens mean (min-max) | completion tokens mean | clipped ratio mean | perception mean (min-max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = list(base_figures(data).values())
    if base:
        lines.append(f"| base (pretrained, no RL) | - | - | {len(base)} | "
                     f"{_span([b['accuracy'] for b in base], 100, unit='%')} | "
                     f"{_span([b['reasoning_tokens'] for b in base])} | "
                     f"{statistics.fmean(b['completion_tokens'] for b in base):.1f} | "
                     f"{statistics.fmean(b['clipped_ratio'] for b in base):.3f} | "
                     f"{_span([b['perception'] for b in base if b.get('perception') is not None], 100, unit='%')} |")
    for row in ROWS:
        entry = data["rows"].get(row)
        paper = PAPER[row]
        if not entry or not entry.get("summary", {}).get("seeds_done"):
            lines.append(f"| {row} | {paper['reasoning_tokens'] or '-'} | {paper['score']} | 0 | not run | | | | |")
            continue
        s = entry["summary"]
        acc, rea = s["accuracy"], s["reasoning_tokens"]
        per = s.get("perception")
        lines.append(
            f"| {row} | {paper['reasoning_tokens'] or '-'} | {paper['score']} | {s['seeds_done']} | "
            f"{100 * acc['mean']:.1f}% ({100 * acc['min']:.1f}-{100 * acc['max']:.1f}) | "
            f"{rea['mean']:.1f} ({rea['min']:.1f}-{rea['max']:.1f}) | {s['completion_tokens']['mean']:.1f} | "
            f"{s['clipped_ratio']['mean']:.3f} | "
            + (f"{100 * per['mean']:.1f}% ({100 * per['min']:.1f}-{100 * per['max']:.1f})" if per else "") + " |")
    return "\n".join(lines)


def per_seed_table(data: dict) -> str:
    """Accuracy, reasoning tokens and wall time of every row and seed."""
    seeds = sorted({int(k) for e in data["rows"].values() for k in (e.get("seeds") or {})})
    lines = ["| row | " + " | ".join(f"seed {k}" for k in seeds) + " |", "|---|" + "---|" * len(seeds)]
    base = base_figures(data)
    if base:
        lines.append("| base | " + " | ".join(
            f"{100 * base[str(k)]['accuracy']:.1f}%, {base[str(k)]['reasoning_tokens']:.1f}" if str(k) in base
            else "not run" for k in seeds) + " |")
    for row in ROWS:
        runs = (data["rows"].get(row) or {}).get("seeds") or {}
        cells = []
        for k in seeds:
            run = runs.get(str(k))
            if not run:
                cells.append("not run")
            elif "accuracy" not in run:
                cells.append("failed")
            else:
                cells.append(f"{100 * run['accuracy']:.1f}%, {run['reasoning_tokens']:.1f} ({run['wall_seconds']:.0f} s)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(data: dict, path: Path = FIGURE) -> Path:
    """Score against reasoning length per row, ours beside the paper's (as its Figure 1 does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ours, paper) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(ROWS, ("tab:gray", "tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple")))
    for row in ROWS:
        entry = data["rows"].get(row) or {}
        done = [s for s in (entry.get("seeds") or {}).values() if "accuracy" in s]
        if done:
            xs = [s["reasoning_tokens"] for s in done]
            ys = [100 * s["accuracy"] for s in done]
            ours.scatter(xs, ys, color=colors[row], alpha=0.35, s=18)
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            ours.errorbar(mx, my, xerr=[[mx - min(xs)], [max(xs) - mx]], yerr=[[my - min(ys)], [max(ys) - my]],
                          fmt="o", color=colors[row], capsize=3, label=f"{row} (n={len(done)})")
        p = PAPER[row]
        if p["reasoning_tokens"] is not None:
            paper.scatter(p["reasoning_tokens"], p["score"], color=colors[row], s=40)
            paper.annotate(p["label"], (p["reasoning_tokens"], p["score"]), fontsize=8,
                           xytext=(4, 4), textcoords="offset points")
    ours.axhline(25, color="grey", lw=0.8, ls="--", label="chance (4 options)")
    base = list(base_figures(data).values())
    if base:
        ours.axhline(100 * statistics.fmean(b["accuracy"] for b in base), color="black", lw=0.8, ls=":",
                     label=f"pretrained base, direct answers (n={len(base)})")
    ours.set(title="This project, toy task (mean, min-max over seeds)", xlabel="mean reasoning tokens (<think>)",
             ylabel="held-out accuracy (%)")
    ours.legend(fontsize=8)
    paper.set(title="The paper (7B, Table 4)", xlabel="average reasoning length (tokens)",
              ylabel="average score")
    for ax in (ours, paper):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_rows(text: str | None) -> list[str]:
    if not text:
        return list(ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise BenchError(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ROWS)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help=f"comma-separated rows (default all: {','.join(ROWS)})")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/visionr1-ablation"),
                        help="where the runs' artifacts go (default /tmp/visionr1-ablation)")
    parser.add_argument("--figure", action="store_true", help="only redraw the figure and print the table from --out")
    parser.add_argument("--force", action="store_true", help="run rows and seeds that --out holds already")
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
        if args.seeds < 1:
            raise BenchError(f"--seeds: must be at least 1, got {args.seeds}")
        if args.figure:
            data = load_results(args.out)
        else:
            for row in rows:
                load_manifest(row)
            data = sweep(rows, args.seeds, args.out.resolve(), args.work.resolve(), force=args.force)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(data))
    print()
    print(per_seed_table(data))
    print(f"figure: {figure(data)}")
    failures = (data.get("runs") or [{}])[-1].get("failures") if not args.figure else None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
