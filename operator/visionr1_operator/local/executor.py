"""The embedded executor: run a VisionR1Run's plan on this machine, stage by stage.

The same plan the operator turns into Jobs (``plan.build_plan``) runs here as
subprocesses, ``python -m visionr1_trainer <stage> --config <file>``, with the same
stage configs: one code path for both. The run's status (the custom resource's
``status``, same schema) is kept in ``<run dir>/status.json``, so ``visionr1 status``
reads a local run the way ``kubectl get vr1`` reads a cluster run.

- A stage whose final artifact is committed is skipped on a re-run; a stage that was
  interrupted resumes from its own last committed checkpoint.
- Ctrl-C reaches the running stage too (same terminal process group); the stage
  commits a checkpoint and exits, the executor records where it stopped and exits 130.
- Progress: a bar per stage with ETA, fed by the stage's metrics log, and a live line
  with reward and completion length during GRPO. Each stage serves Prometheus metrics
  on localhost (the same series as on a cluster).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from visionr1_trainer.config import FINAL_ARTIFACT, artifact_uri

from ..api import Condition, StageStatus, VisionR1Run, VisionR1RunStatus
from ..plan import StagePlan, build_plan

STATUS_FILE = "status.json"
EXIT_STOPPED_BY_SIGNAL = (130, 143, -signal.SIGINT, -signal.SIGTERM)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_path(uri: str) -> Path:
    """The directory of a ``file://`` URI (relative ones are relative to the working dir)."""
    if not uri.startswith("file://"):
        raise ValueError(f"{uri}: the local executor runs with file:// storage only")
    return Path(uri[len("file://"):]).resolve()


def with_local_storage(run: VisionR1Run, storage_uri: str | None) -> VisionR1Run:
    """The run with its storage pointed at this machine.

    A manifest written for a cluster names s3:// or pvc:// storage; locally the
    artifacts go to ``storage_uri`` (default ``file://./runs``) unless the manifest
    already uses file://.
    """
    if storage_uri is None and run.spec.storage.uri.startswith("file://"):
        return run
    storage = run.spec.storage.model_copy(update={
        "uri": storage_uri or "file://./runs", "credentials_secret": None, "endpoint": None, "region": None,
    })
    return run.model_copy(update={"spec": run.spec.model_copy(update={"storage": storage})})


def run_dir(run: VisionR1Run) -> Path:
    return local_path(artifact_uri(run.spec.storage.uri, run.namespace, run.name))


def stage_dir(plan: StagePlan) -> Path:
    return local_path(plan.output_uri)


def stage_log(plan: StagePlan) -> Path:
    """The metrics log a stage appends to (its work dir beside a local output)."""
    return stage_dir(plan) / "_work" / "metrics.jsonl"


def stage_committed(plan: StagePlan) -> bool:
    from visionr1_trainer.storage import open_store  # local file store only; no cloud SDK needed

    return open_store(plan.output_uri).is_committed(FINAL_ARTIFACT[plan.kind])


# --- status -------------------------------------------------------------------------------


def load_status(directory: Path) -> VisionR1RunStatus | None:
    path = directory / STATUS_FILE
    if not path.exists():
        return None
    return VisionR1RunStatus.model_validate(json.loads(path.read_text()))


def save_status(directory: Path, status: VisionR1RunStatus) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2))
    os.replace(tmp, directory / STATUS_FILE)  # a reader never sees half a file


def initial_status(plans: list[StagePlan], previous: VisionR1RunStatus | None) -> VisionR1RunStatus:
    """One record per planned stage, keeping what an earlier invocation recorded."""
    old = {s.name: s for s in (previous.stages if previous else [])}
    records = [old.get(p.name) or StageStatus(name=p.name, kind=p.kind) for p in plans]
    return VisionR1RunStatus(phase="Pending", stages=records, conditions=previous.conditions if previous else [])


def set_condition(status: VisionR1RunStatus, type_: str, value: bool, reason: str, message: str = "") -> None:
    text = "True" if value else "False"
    for i, cond in enumerate(status.conditions):
        if cond.type == type_:
            if cond.status != text or cond.reason != reason or cond.message != message:
                status.conditions[i] = Condition(type=type_, status=text, reason=reason, message=message,
                                                  last_transition_time=now() if cond.status != text else cond.last_transition_time)
            return
    status.conditions.append(Condition(type=type_, status=text, reason=reason, message=message,
                                       last_transition_time=now()))


# --- running one stage ---------------------------------------------------------------------


@dataclass
class StageProgress:
    """What the progress display needs from a stage's metrics log."""

    step: int = 0
    total: int | None = None
    reward: float | None = None
    completion_length: float | None = None
    loss: float | None = None


def read_progress(log: Path, offset: int, progress: StageProgress) -> int:
    """Fold the log's new complete lines into ``progress``; returns the new offset."""
    if not log.exists():
        return offset
    with log.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = record.get("type")
        if kind == "set":
            progress.total = int(record.get("total_steps") or record.get("shards_total") or record.get("units_total")
                                 or progress.total or 0) or None
        elif kind == "start":
            progress.step = int(record.get("step", progress.step) or 0)
        elif kind == "step":
            progress.step = int(record.get("step", progress.step))
            progress.reward = record.get("reward_mean", progress.reward)
            progress.completion_length = record.get("completion_length_mean", progress.completion_length)
            progress.loss = record.get("loss", progress.loss)
    return offset + end


def free_port(preferred: int) -> int:
    """``preferred`` when it is free on localhost, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def launch(plan: StagePlan, config_path: Path, log_file: Path) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = log_file.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "visionr1_trainer", plan.kind, "--config", str(config_path)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_stage(plan: StagePlan, config_path: Path, log_file: Path,
              on_progress: Callable[[StageProgress], None], poll: float = 0.5) -> int:
    """Run one stage to its end; report progress from its metrics log while it runs."""
    log, offset, progress = stage_log(plan), 0, StageProgress()
    proc = launch(plan, config_path, log_file)
    while proc.poll() is None:
        offset = read_progress(log, offset, progress)
        on_progress(progress)
        time.sleep(poll)
    read_progress(log, offset, progress)
    on_progress(progress)
    return proc.returncode


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the whole run ----------------------------------------------------------------------------


class _Interrupt:
    """Ctrl-C while a stage runs: the stage gets it too and stops on its own; we wait."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def stage_config(plan: StagePlan, attempt: int, directory: Path, metrics_port: int) -> Path:
    """Write the stage's config (the JSON the operator puts in a ConfigMap) for this attempt."""
    config = plan.for_attempt(attempt).config.model_copy(update={
        "metrics_port": metrics_port,
        "termination_message_path": str(directory / "logs" / f"{plan.name}.summary.json"),
    })
    path = directory / "configs" / f"{plan.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_json_dict(), indent=2))
    return path


# Per-attempt details that do not change what a stage computes.
_VOLATILE = ("attempt", "metricsPort", "terminationMessagePath")


def config_changed(plan: StagePlan, directory: Path) -> bool:
    """True when a stage that already ran was configured differently then."""
    path = directory / "configs" / f"{plan.name}.json"
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    now_ = plan.config.to_json_dict()
    return {k: v for k, v in before.items() if k not in _VOLATILE} != {
        k: v for k, v in now_.items() if k not in _VOLATILE}


def read_summary(directory: Path, plan: StagePlan) -> dict:
    path = directory / "logs" / f"{plan.name}.summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def execute(run: VisionR1Run, display, metrics_port: int = 9400) -> int:
    """Run every stage of ``run`` that is not committed yet. Returns the exit status."""
    plans = build_plan(run)
    directory = run_dir(run)
    status = initial_status(plans, load_status(directory))
    set_condition(status, "Failed", False, "Running")
    set_condition(status, "Suspended", False, "Running")
    port = free_port(metrics_port)
    display.start(run, plans, directory, port)
    with _Interrupt() as interrupt:
        for plan, record in zip(plans, status.stages):
            if stage_committed(plan):
                if record.state != "Succeeded":
                    record.state, record.artifact_uri = "Succeeded", f"{plan.output_uri}/{FINAL_ARTIFACT[plan.kind]}"
                # A finished stage is never re-run behind the user's back, nor is a
                # change to its settings silently ignored: say so (the operator sets a
                # condition for the same case).
                display.skipped(plan, changed=config_changed(plan, directory))
                continue
            record.state, record.attempts = "Running", record.attempts + 1
            record.start_time = record.start_time or now()
            record.message = None
            status.phase, status.current_stage = "Running", plan.name
            set_condition(status, "Ready", True, "StageRunning", f"stage {plan.name} is running")
            save_status(directory, status)
            config_path = stage_config(plan, record.attempts, directory, port)
            log_file = directory / "logs" / f"{plan.name}.log"
            code = run_stage(plan, config_path, log_file, lambda p, plan=plan: display.progress(plan, p))
            record.summary = read_summary(directory, plan) or None
            if code == 0 and stage_committed(plan):
                record.state, record.completion_time = "Succeeded", now()
                record.artifact_uri = f"{plan.output_uri}/{FINAL_ARTIFACT[plan.kind]}"
                if plan.kind == "eval" and record.summary:
                    status.eval = {k: v for k, v in record.summary.items() if k not in ("stage", "attempt")}
                save_status(directory, status)
                display.finished(plan, record)
                continue
            stopped = interrupt.hit or code in EXIT_STOPPED_BY_SIGNAL
            record.state = "Pending" if stopped else "Failed"
            record.message = "stopped on request" if stopped else (
                (record.summary or {}).get("error") or f"exit status {code}; see {log_file}")
            status.phase = "Suspended" if stopped else "Failed"
            if stopped:
                set_condition(status, "Suspended", True, "Interrupted", f"stopped during {plan.name}; run again to resume")
            else:
                set_condition(status, "Failed", True, "StageFailed", f"stage {plan.name} failed: {record.message}")
                set_condition(status, "Ready", False, "StageFailed", record.message)
            save_status(directory, status)
            display.stopped(plan, record, tail(log_file)) if stopped else display.failed(plan, record, tail(log_file))
            return 130 if stopped else 1
    status.phase, status.current_stage = "Succeeded", None
    set_condition(status, "Succeeded", True, "AllStagesSucceeded", f"{len(plans)} stages succeeded")
    set_condition(status, "Ready", True, "AllStagesSucceeded")
    set_condition(status, "Suspended", False, "Completed")
    save_status(directory, status)
    display.done(status, directory)
    return 0
