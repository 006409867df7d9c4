"""What `visionr1 run` shows: a progress bar per stage with ETA, a live GRPO line, results."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..api import StageStatus, VisionR1Run, VisionR1RunStatus
from ..plan import StagePlan
from .executor import StageProgress


class RichDisplay:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self.bars = Progress(
            TextColumn("{task.fields[stage]:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
            console=self.console,
        )
        self.tasks: dict[str, int] = {}

    def start(self, run: VisionR1Run, plans: list[StagePlan], directory: Path, port: int) -> None:
        self.console.print(f"[bold]VisionR1Run {run.name}[/]: {len(plans)} stages ({', '.join(p.name for p in plans)})")
        self.console.print(f"  artifacts and status: {directory}")
        self.console.print(f"  live metrics: http://127.0.0.1:{port}/metrics (while a stage runs)")
        for plan in plans:
            self.tasks[plan.name] = self.bars.add_task("", total=None, stage=plan.name, live="", start=False)
        self.bars.start()

    def _task(self, plan: StagePlan) -> int:
        return self.tasks[plan.name]

    def waiting(self, message: str) -> None:
        self.console.print(f"[yellow]waiting[/]: {escape(message)}")

    def skipped(self, plan: StagePlan) -> None:
        self.bars.update(self._task(plan), total=1, completed=1, live="committed earlier: skipped")

    def note(self, plan: StagePlan, message: str) -> None:
        self.console.print(f"[yellow]note[/]: {plan.name}: {escape(message)}")

    def rerun(self, plan: StagePlan, changed: list[str], committed: bool) -> None:
        what = escape(", ".join(changed))
        if committed:
            self.console.print(f"[yellow]{plan.name}[/]: its inputs changed since it was committed ({what}): "
                               "running it again from scratch (its old output is removed)")
        else:
            self.console.print(f"[yellow]{plan.name}[/]: its inputs changed since it was interrupted ({what}): "
                               "starting it fresh, not resuming from its checkpoints")

    def progress(self, plan: StagePlan, p: StageProgress) -> None:
        task = self._task(plan)
        self.bars.start_task(task)
        live = ""
        if p.reward is not None:
            live = f"reward {p.reward:.3f}  len {p.completion_length or 0:.1f}"
        elif p.loss is not None:
            live = f"loss {p.loss:.4f}"
        self.bars.update(task, total=p.total, completed=p.step, live=live)

    def finished(self, plan: StagePlan, record: StageStatus) -> None:
        task = self._task(plan)
        total = self.bars.tasks[task].total or self.bars.tasks[task].completed or 1
        self.bars.update(task, total=total, completed=total, live=_summary_text(record.summary))

    def stopped(self, plan: StagePlan, record: StageStatus, log_tail: str) -> None:
        self.bars.stop()
        self.console.print(f"[yellow]stopped during {plan.name}[/] ({escape(record.message or '')}): committed progress is "
                           "kept; run the same command again to resume")

    def stopped_before(self, plan: StagePlan, why: str) -> None:
        self.bars.stop()
        self.console.print(f"[yellow]stopped before {plan.name}[/] ({escape(why)}): every stage before it is committed; "
                           "run the same command again to continue")

    def failed(self, plan: StagePlan, record: StageStatus, log_tail: str) -> None:
        self.bars.stop()
        self.console.print(f"[red]stage {plan.name} failed[/]: {escape(record.message or '')}")
        if log_tail:
            self.console.print(log_tail, markup=False, highlight=False)

    def done(self, run: VisionR1Run, status: VisionR1RunStatus, directory: Path) -> None:
        self.bars.stop()
        self.console.print(f"[green]Succeeded[/]: every stage committed. Report: visionr1 report {directory}")
        print_status(self.console, run.name, status)


def _summary_text(summary: dict | None) -> str:
    if not summary:
        return "done"
    parts = []
    for key in ("reward", "accuracy", "loss", "kept"):
        if isinstance(summary.get(key), (int, float)):
            parts.append(f"{key} {summary[key]:.3g}")
    return ", ".join(parts) or "done"


def latest_reward(status: VisionR1RunStatus) -> float | None:
    """The running stage's live reward, else the last finished stage's that has one (GRPO)."""
    if status.phase == "Running" and status.progress and status.progress.reward is not None:
        return status.progress.reward
    for stage in reversed(status.stages):
        reward = (stage.summary or {}).get("reward")
        if stage.state == "Succeeded" and isinstance(reward, (int, float)):
            return float(reward)
    return status.progress.reward if status.progress else None


def print_status(console: Console, name: str, status: VisionR1RunStatus) -> None:
    """`kubectl get vr1`-style view of a status; ``name`` is the run's."""
    reward = latest_reward(status)
    head = Table(box=None, show_edge=False)
    for col in ("NAME", "PHASE", "STAGE", "REWARD"):
        head.add_column(col)
    head.add_row(name, status.phase, status.current_stage or "-", f"{reward:.3f}" if reward is not None else "-")
    console.print(head)
    table = Table(box=None, show_edge=False)
    for col in ("STAGE", "KIND", "STATE", "ATTEMPTS", "SUMMARY", "ARTIFACT"):
        table.add_column(col, overflow="fold")
    for s in status.stages:
        table.add_row(s.name, s.kind, s.state, str(s.attempts), _summary_text(s.summary) if s.summary else "-",
                      s.artifact_uri or "-")
    console.print(table)
    for cond in status.conditions:
        if cond.status == "True":
            console.print(f"  {cond.type}: {cond.reason}{' - ' + cond.message if cond.message else ''}")
