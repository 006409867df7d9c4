"""`visionr1 run|status|report|demo`: the embedded (no cluster) side of the CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from .manifest import ManifestError, load_run

DEMO_MANIFEST = Path("examples/tiny-cpu.yaml")
DEMO_INPUTS = Path("runs/default/tiny-cpu/inputs")


def _errors(lines) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for line in lines:
        err.print(line, markup=False)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from .local.display import RichDisplay
    from .local.executor import execute, with_local_storage
    from .local.lock import RunLocked

    try:
        run = with_local_storage(load_run(args.file), args.storage)
    except ManifestError as exc:
        return _errors(exc.lines())
    try:
        return execute(run, RichDisplay(), metrics_port=args.metrics_port)
    except RunLocked as exc:
        return _errors([f"error: {exc}"])


def _run_dir(target: str) -> Path:
    """A run directory, or the one a manifest's local run uses."""
    path = Path(target)
    if path.is_file():
        from .local.executor import run_dir, with_local_storage

        return run_dir(with_local_storage(load_run(path), None))
    return path


def cmd_status(args: argparse.Namespace) -> int:
    from .local.executor import load_status
    from .local.display import print_status

    try:
        directory = _run_dir(args.target)
    except ManifestError as exc:
        return _errors(exc.lines())
    status = load_status(directory)
    if status is None:
        return _errors([f"{directory}: no local run here (no status.json)"])
    print_status(Console(highlight=False), directory.name, status)
    return 0 if status.phase != "Failed" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .local.report import ReportError, write_report
    from .local.executor import load_status
    from .local.display import print_status

    try:
        directory = _run_dir(args.target)
        index, plots = write_report(directory)
    except (ManifestError, ReportError) as exc:
        return _errors(exc.lines() if isinstance(exc, ManifestError) else [str(exc)])
    except ModuleNotFoundError as exc:
        return _errors([f"visionr1 report needs matplotlib (the train extra): {exc}"])
    console = Console(highlight=False)
    if getattr(args, "show_status", True):  # the demo has just printed it at the run's end
        print_status(console, directory.name, load_status(directory))
    _print_eval(console, directory)
    console.print(f"report: {index}")
    for name, path in plots.items():
        console.print(f"  {name}: {path or 'no data'}")
    return 0


def _print_eval(console: Console, directory: Path) -> None:
    from rich.table import Table

    from .local.report import eval_table, load_run_data

    benches, labels, cells = eval_table(load_run_data(directory))
    if not cells:
        return
    table = Table(title="accuracy", title_justify="left")
    table.add_column("benchmark")
    for label in labels:
        table.add_column(label, justify="right")
    for bench in benches:
        table.add_row(bench, *[f"{100 * cells[(bench, l)]['accuracy']:.1f}%" if (bench, l) in cells else "-"
                               for l in labels])
    console.print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo's inputs (tiny model, synthetic data), run the tiny example, report."""
    console = Console(highlight=False)
    console.print(f"preparing the demo inputs in {DEMO_INPUTS} (tiny Qwen2.5-VL, synthetic images)")
    made = subprocess.run([sys.executable, "-m", "visionr1_trainer.demo", str(DEMO_INPUTS)])
    if made.returncode:
        return _errors(["could not prepare the demo inputs (see above)"])
    code = cmd_run(argparse.Namespace(file=str(DEMO_MANIFEST), storage=None, metrics_port=args.metrics_port))
    if code:
        return code
    return cmd_report(argparse.Namespace(target=str(DEMO_MANIFEST), show_status=False))


def register(sub) -> None:
    p = sub.add_parser("run", help="run a VisionR1Run on this machine (no cluster)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--storage", help="artifact root for this local run (default: the manifest's file:// "
                   "storage, else file://./runs)")
    p.add_argument("--metrics-port", type=int, default=9400, help="localhost port for the stages' /metrics")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show a local run's status (like kubectl get vr1)")
    p.add_argument("target", metavar="RUN_DIR_OR_FILE")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="write an HTML report with plots of a local run")
    p.add_argument("target", metavar="RUN_DIR_OR_FILE")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the README's demo: tiny model, synthetic data, every stage, a report")
    p.add_argument("--metrics-port", type=int, default=9400)
    p.set_defaults(func=cmd_demo)
