"""`visionr1 report RUN_DIR`: a self-contained HTML report and PNG plots of a run.

Reads only what the stages committed or logged under the run directory
(``<storage>/<namespace>/<run>``): ``status.json``, each stage's metrics log
(``<stage>/_work/metrics.jsonl``), the bridge stage's ``dataset/stats.json`` and the
eval stage's ``results/summary.json``. Plots, in the manner of the paper's figures:
reward and completion length per step across the PTST stages, SFT loss, the bridge
statistics, and the eval table of base, SFT and each PTST stage side by side.

When the eval stage has committed its results, ``report/results.json`` holds each
model's figures (``{"models": {"base"|"sft"|"ptst-1"|...: {"accuracy",
"reasoning_tokens", "completion_tokens", "clipped_ratio", ...}}}``, see
``visionr1_trainer.results``): accuracy on the held-out split and the paper's reasoning
length, mean tokens inside ``<think>``.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..api import VisionR1RunStatus
from .executor import STATUS_FILE


class ReportError(Exception):
    """The directory is not a run directory, or holds nothing to report."""


@dataclass
class RunData:
    directory: Path
    status: VisionR1RunStatus
    logs: dict[str, list[dict]] = field(default_factory=dict)  # stage -> step records
    bridge_stats: dict | None = None
    eval_summary: dict | None = None


def _jsonl_steps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed stage
        if record.get("type") == "step":
            out.append(record)
    return out


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run_data(directory: str | Path) -> RunData:
    directory = Path(directory)
    if not (directory / STATUS_FILE).exists():
        raise ReportError(f"{directory}: no {STATUS_FILE} here; give the run directory `visionr1 run` printed")
    status = VisionR1RunStatus.model_validate(json.loads((directory / STATUS_FILE).read_text()))
    data = RunData(directory, status)
    for record in status.stages:
        data.logs[record.name] = _jsonl_steps(directory / record.name / "_work" / "metrics.jsonl")
    data.bridge_stats = _json(directory / "bridge" / "dataset" / "stats.json")
    data.eval_summary = _json(directory / "eval" / "results" / "summary.json")
    return data


# --- plots --------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_ptst(data: RunData, out: Path) -> Path | None:
    """Reward and completion length per step, PTST stages one after another."""
    stages = [s for s in data.status.stages if s.kind == "grpo" and data.logs.get(s.name)]
    if not stages:
        return None
    plt = _figure()
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 3.8))
    offset = 0
    for record in stages:
        steps = data.logs[record.name]
        x = [offset + r["step"] for r in steps]
        ax_r.plot(x, [r.get("reward_mean") for r in steps], label=record.name)
        ax_l.plot(x, [r.get("completion_length_mean") for r in steps], label=record.name)
        validated = [(offset + r["step"], r["validation_accuracy"]) for r in steps if "validation_accuracy" in r]
        if validated:  # grpo.validation: accuracy on the held-out split, on the reward's 0-1 scale
            ax_r.plot(*zip(*validated), marker="o", ls="--", label=f"{record.name} validation accuracy")
        offset = x[-1]
        for ax in (ax_r, ax_l):
            ax.axvline(offset, color="grey", lw=0.6, ls=":")
    ax_r.set(title="Reward (HFRRF) per step", xlabel="GRPO step", ylabel="mean reward / accuracy")
    ax_l.set(title="Completion length per step", xlabel="GRPO step", ylabel="mean tokens")
    for ax in (ax_r, ax_l):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out / "ptst.png")


def plot_sft(data: RunData, out: Path) -> Path | None:
    steps = data.logs.get("sft") or []
    if not steps or "loss" not in steps[0]:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax.set(title="Cold-start SFT loss", xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    return _save(fig, out / "sft.png")


def plot_bridge(data: RunData, out: Path) -> Path | None:
    stats = data.bridge_stats
    if not stats:
        return None
    plt = _figure()
    fig, (ax_k, ax_h, ax_m) = plt.subplots(1, 3, figsize=(13, 3.6))
    reasons = {"kept": stats.get("kept", 0), **stats.get("dropped", {})}
    ax_k.barh(list(reasons), list(reasons.values()), color=["tab:green"] + ["tab:red"] * (len(reasons) - 1))
    ax_k.set(title=f"Samples: {stats.get('samples_in', 0)} in", xlabel="samples")
    hist = (stats.get("reasoning_words") or {}).get("histogram")
    if hist:
        edges, counts = hist["edges"], hist["counts"]
        ax_h.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge")
    ax_h.set(title="Reasoning length", xlabel="words", ylabel="samples")
    markers = (stats.get("self_reflection") or {}).get("by_marker", {})
    ax_m.barh(list(markers), list(markers.values()))
    ax_m.set(title="Self-reflection markers", xlabel="occurrences")
    return _save(fig, out / "bridge.png")


def eval_table(data: RunData) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(benchmarks, model labels, cells) from the eval summary (``summary[bench][label]``)."""
    summary = data.eval_summary or {}
    benches = summary.get("benchmarks", summary)
    cells: dict[tuple[str, str], dict] = {}
    labels: list[str] = []
    for bench, by_label in benches.items():
        if not isinstance(by_label, dict):
            continue
        for label, result in by_label.items():
            if isinstance(result, dict) and "accuracy" in result:
                cells[(bench, label)] = result
                labels += [label] if label not in labels else []
    return sorted({b for b, _ in cells}), labels, cells


def plot_eval(data: RunData, out: Path) -> Path | None:
    benches, labels, cells = eval_table(data)
    if not cells:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) * len(benches)), 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [b + i * width for b in range(len(benches))]
        ax.bar(xs, [100 * cells.get((bench, label), {}).get("accuracy", 0) for bench in benches], width, label=label)
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(benches))], benches)
    ax.set(title="Accuracy by model", ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=8)
    return _save(fig, out / "eval.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- html -----------------------------------------------------------------------------------


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p class=missing>No {html.escape(alt)} data in this run.</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _eval_html(data: RunData) -> str:
    benches, labels, cells = eval_table(data)
    if not cells:
        return "<p class=missing>No eval results in this run.</p>"
    rows = ["<tr><th>benchmark</th>" + "".join(f"<th>{html.escape(l)}</th>" for l in labels) + "</tr>"]
    for bench in benches:
        tds = "".join(
            f"<td>{100 * cells[(bench, l)]['accuracy']:.1f}% <small>(n={cells[(bench, l)].get('n', '?')})</small></td>"
            if (bench, l) in cells else "<td>-</td>" for l in labels
        )
        rows.append(f"<tr><th>{html.escape(bench)}</th>{tds}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _stages_html(status: VisionR1RunStatus) -> str:
    rows = ["<tr><th>stage</th><th>state</th><th>attempts</th><th>summary</th></tr>"]
    for s in status.stages:
        summary = html.escape(json.dumps(s.summary)) if s.summary else "-"
        rows.append(f"<tr><td>{s.name}</td><td>{s.state}</td><td>{s.attempts}</td><td><code>{summary}</code></td></tr>")
    return "<table>" + "".join(rows) + "</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}img{max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
code{font-size:0.8em}.missing{color:#888}"""


RESULTS_FILE = "results.json"


def write_results(data: RunData, out: Path) -> dict | None:
    """``report/results.json`` from the eval stage's records; None when eval has not run."""
    if data.eval_summary is None:
        (out / RESULTS_FILE).unlink(missing_ok=True)  # never a stale one from an earlier eval
        return None
    from visionr1_trainer.results import ResultsError, run_results

    try:
        results = run_results(data.directory)
    except ResultsError as exc:
        raise ReportError(str(exc)) from None
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _results_html(results: dict | None) -> str:
    if not results:
        return ""
    rows = ["<tr><th>model</th><th>accuracy</th><th>reasoning tokens</th><th>completion tokens</th>"
            "<th>clipped</th></tr>"]
    for label, f in results["models"].items():
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{100 * f['accuracy']:.1f}%</td>"
                    f"<td>{f['reasoning_tokens']:.1f}</td><td>{f['completion_tokens']:.1f}</td>"
                    f"<td>{100 * f['clipped_ratio']:.1f}%</td></tr>")
    return (f"<p>On <code>{html.escape(results['benchmark'])}</code>; reasoning tokens are the mean "
            f"tokens inside &lt;think&gt; (<a href=\"{RESULTS_FILE}\">{RESULTS_FILE}</a>).</p>"
            "<table>" + "".join(rows) + "</table>")


def write_report(directory: str | Path) -> tuple[Path, dict[str, Path | None]]:
    """Write ``report/index.html``, the PNGs and ``results.json``; returns the HTML path and the plots."""
    data = load_run_data(directory)
    out = data.directory / "report"
    out.mkdir(exist_ok=True)
    results = write_results(data, out)
    plots = {
        "ptst": plot_ptst(data, out), "sft": plot_sft(data, out),
        "bridge": plot_bridge(data, out), "eval": plot_eval(data, out),
    }
    name = data.directory.name
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Vision-R1 run {html.escape(name)}</title>
<style>{STYLE}</style></head><body>
<h1>Vision-R1 run <code>{html.escape(name)}</code>: {data.status.phase}</h1>
<h2>Evaluation</h2>{_eval_html(data)}{_results_html(results)}{_img(plots["eval"], "eval")}
<h2>PTST (GRPO) stages</h2>{_img(plots["ptst"], "PTST")}
<h2>Cold-start SFT</h2>{_img(plots["sft"], "SFT loss")}
<h2>Modality Bridging data</h2>{_img(plots["bridge"], "bridge statistics")}
<h2>Stages</h2>{_stages_html(data.status)}
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index, plots
