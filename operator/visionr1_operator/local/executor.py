"""The embedded executor: run a VisionR1Run's plan on this machine, stage by stage.

The same plan the operator turns into Jobs (``plan.build_plan``) runs here as
subprocesses, ``python -m visionr1_trainer <stage> --config <file>``, with the same
stage configs: one code path for both. The run's status (the custom resource's
``status``, same schema) is kept in ``<run dir>/status.json``, so ``visionr1 status``
reads a local run the way ``kubectl get vr1`` reads a cluster run.

- A stage committed from its current inputs is skipped on a re-run; one whose inputs
  changed (its settings, or the commit of a stage it reads: ``inputs``) runs again from
  scratch, and so do the stages after it that read it. An interrupted stage resumes from
  its own last committed checkpoint, unless its inputs changed: then it starts afresh.
- One executor per run directory (``lock``): a second ``visionr1 run`` is refused,
  naming the holder.
- Ctrl-C (SIGINT) and SIGTERM are passed on to the running stage (its own process
  group); the stage commits a checkpoint and exits, the executor records where it
  stopped (phase Suspended, the signal named) and exits 128 + the signal. No stage
  starts after a stop was asked for. A stage whose executor was killed outright is
  sent SIGTERM by the kernel.
- Progress: a bar per stage with ETA, fed by the stage's metrics log, and a live line
  with reward and completion length during GRPO. Each stage serves Prometheus metrics
  on localhost (the same series as on a cluster).
"""

from __future__ import annotations

import json
import os
import shutil
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

from ..api import Condition, Progress, StageStatus, VisionR1Run, VisionR1RunStatus, eval_table
from ..plan import StagePlan, build_plan
from . import inputs
from .lock import RunLock, RunLocked
from .lock import acquire as acquire_lock

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
    """One record per planned stage, keeping what an earlier invocation recorded.

    A record still Running belongs to an executor that died without a word (we hold the
    run's lock now, so nothing runs it): it is Pending again, and says so.
    """
    old = {s.name: s for s in (previous.stages if previous else [])}
    records = [old.get(p.name) or StageStatus(name=p.name, kind=p.kind) for p in plans]
    for record in records:
        if record.state == "Running":
            record.state, record.message = "Pending", "interrupted: its executor ended without recording it"
    return VisionR1RunStatus(phase="Pending", stages=records, conditions=previous.conditions if previous else [],
                             eval=previous.eval if previous else None)


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


# The stage is exec'd through this snippet, which first asks the kernel to send it SIGTERM
# (a graceful stop: the trainer commits a checkpoint and exits) if the executor dies
# without a chance to stop it (SIGKILL, OOM killer). Linux only; elsewhere it just execs.
_EXEC_WITH_PARENT_DEATH_SIGNAL = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):  # the executor died before the line above
    sys.exit(143)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def launch(plan: StagePlan, config_path: Path, log_file: Path, keep_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start a stage in its own process group (signals reach it through the executor only,
    which forwards them: see ``Stop``); ``keep_fds`` (the run directory's lock) stay open in it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()),
             "-m", "visionr1_trainer", plan.kind, "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, process_group=0, pass_fds=keep_fds,
        )


def run_stage(plan: StagePlan, config_path: Path, log_file: Path, on_progress: Callable[[StageProgress], None],
              stop: Stop | None = None, lock: RunLock | None = None, poll: float = 0.5) -> int:
    """Run one stage to its end; report progress from its metrics log while it runs.

    A stop asked for while it runs (``stop``) is passed on to it; one asked for before it
    started reaches it as soon as it exists.
    """
    log, offset, progress = stage_log(plan), 0, StageProgress()
    proc = launch(plan, config_path, log_file, keep_fds=(lock.fd,) if lock else ())
    if lock:
        lock.update(stage=plan.name, stagePid=proc.pid)
    if stop:
        stop.attach(proc)
    try:
        while proc.poll() is None:
            offset = read_progress(log, offset, progress)
            on_progress(progress)
            time.sleep(poll)
    finally:
        if stop:
            stop.detach()
        if proc.poll() is None:  # the executor itself is failing: take the stage down with it
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if lock:
            lock.update(stage=None, stagePid=None)
    read_progress(log, offset, progress)
    on_progress(progress)
    return proc.returncode


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the whole run ----------------------------------------------------------------------------


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, systemd, a batch scheduler): a stop request.

    The stage runs in its own process group, so the terminal's Ctrl-C reaches the executor
    alone; each signal is passed on to the stage's group (the trainer's first SIGINT or any
    SIGTERM commits a checkpoint and exits, a second SIGINT stops it at once), and a third
    signal kills the group. Once a stop was asked for, no stage starts.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._child: subprocess.Popen | None = None
        self._old: dict = {}

    def __enter__(self) -> Stop:
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started in the background by a shell (`&` in a script): it stays ignored
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        self._forward(signal.SIGKILL if self.count >= 3 else signum)

    def _forward(self, signum: int) -> None:
        child = self._child
        if child is None or child.returncode is not None:
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    def attach(self, child: subprocess.Popen) -> None:
        self._child = child
        if self.signum is not None:  # asked for while the stage was being started
            self._forward(self.signum)

    def detach(self) -> None:
        self._child = None


def stage_config(plan: StagePlan, attempt: int, directory: Path, metrics_port: int) -> Path:
    """Write the stage's config (the JSON the operator puts in a ConfigMap) for this attempt."""
    config = plan.for_attempt(attempt).config.model_copy(update={
        "metrics_port": metrics_port,
        "termination_message_path": str(summary_path(directory, plan)),
    })
    path = directory / "configs" / f"{plan.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_json_dict(), indent=2))
    return path


def summary_path(directory: Path, plan: StagePlan) -> Path:
    return directory / "logs" / f"{plan.name}.summary.json"


def read_summary(directory: Path, plan: StagePlan) -> dict:
    try:
        return json.loads(summary_path(directory, plan).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def execute(run: VisionR1Run, display, metrics_port: int = 9400) -> int:
    """Run every stage of ``run`` that is not committed from its current inputs. Returns the
    exit status: 0 done, 1 a stage failed, 128 + the signal when stopped on request.

    Raises ``RunLocked`` when another executor holds the run directory.
    """
    plans = build_plan(run)
    directory = run_dir(run)
    with Stop() as stop:
        try:
            lock = acquire_lock(directory, on_wait=display.waiting, cancelled=lambda: stop.requested)
        except RunLocked:
            if stop.requested:
                return stop.exit_code
            raise
        try:
            return _Execution(run, plans, directory, display, stop, lock).run(free_port(metrics_port))
        finally:
            lock.release()


class _Execution:
    """One invocation's walk through the plan; every decision is saved to status.json."""

    def __init__(self, run: VisionR1Run, plans: list[StagePlan], directory: Path, display, stop: Stop, lock: RunLock):
        self.run_, self.plans, self.directory, self.display = run, plans, directory, display
        self.stop, self.lock = stop, lock
        self.status = initial_status(plans, load_status(directory))
        self._progress_saved = 0.0

    def save(self) -> None:
        save_status(self.directory, self.status)

    def run(self, port: int) -> int:
        status = self.status
        # Nothing of an earlier invocation's outcome holds until this one says so.
        for type_ in ("Succeeded", "Failed", "Suspended"):
            set_condition(status, type_, False, "Running")
        self.save()
        self.display.start(self.run_, self.plans, self.directory, port)
        for plan, record in zip(self.plans, status.stages):
            if self.stop.requested:
                return self.stopped_before(plan)
            wanted = inputs.current(plan, self.plans)
            if self.up_to_date(plan, record, wanted):
                continue
            if self.stop.requested:
                return self.stopped_before(plan)
            code = self.attempt(plan, record, wanted, port)
            if code is not None:
                return code
        status.phase, status.current_stage = "Succeeded", None
        set_condition(status, "Succeeded", True, "AllStagesSucceeded", f"{len(self.plans)} stages succeeded")
        set_condition(status, "Ready", True, "AllStagesSucceeded")
        set_condition(status, "Suspended", False, "Completed")
        self.save()
        self.display.done(self.run_, status, self.directory)
        return 0

    def up_to_date(self, plan: StagePlan, record: StageStatus, wanted: inputs.Inputs) -> bool:
        """True when the stage is committed from ``wanted``; otherwise clear what is stale."""
        seen = inputs.load(self.directory, plan.name)
        commit = inputs.commit_id(plan)
        if commit is not None:
            if seen is None or seen.commit not in (None, commit):
                # Committed by an older visionr1 (no record) or replaced behind our back:
                # nothing says what it was made from, so it is kept, and said so.
                self.display.note(plan, "committed with no record of what it was made from: kept as it is "
                                  f"(delete {stage_dir(plan)} to run it again)")
            else:
                changed = inputs.changes(seen.inputs, wanted)
                if changed:
                    self.display.rerun(plan, changed, committed=True)
                    self.reset(plan, record)
                    return False
            inputs.save(self.directory, plan.name, wanted, commit)
            if record.state != "Succeeded" or not record.artifact_uri:
                record.state, record.artifact_uri = "Succeeded", f"{plan.output_uri}/{FINAL_ARTIFACT[plan.kind]}"
                record.completion_time = record.completion_time or now()
            record.config_hash = wanted.digest()
            self.save()
            self.display.skipped(plan)
            return True
        if seen is not None and stage_dir(plan).exists():
            changed = inputs.changes(seen.inputs, wanted)
            if changed:  # never resume from checkpoints made from other inputs
                self.display.rerun(plan, changed, committed=False)
                self.reset(plan, record)
        return False

    def reset(self, plan: StagePlan, record: StageStatus) -> None:
        """Forget a stale stage: its artifacts, checkpoints and metrics log, and its record."""
        shutil.rmtree(stage_dir(plan), ignore_errors=True)
        fresh = StageStatus(name=plan.name, kind=plan.kind)
        for field in StageStatus.model_fields:
            setattr(record, field, getattr(fresh, field))
        if plan.kind == "eval":
            self.status.eval = None
        self.save()

    def attempt(self, plan: StagePlan, record: StageStatus, wanted: inputs.Inputs, port: int) -> int | None:
        """Run the stage once; None when it committed, else the executor's exit status."""
        status, directory = self.status, self.directory
        record.state, record.attempts = "Running", record.attempts + 1
        record.start_time = record.start_time or now()
        record.message = record.artifact_uri = record.completion_time = record.summary = None
        record.config_hash = wanted.digest()
        if plan.kind == "eval":
            status.eval = None
        status.phase, status.current_stage = "Running", plan.name
        set_condition(status, "Ready", True, "StageRunning", f"stage {plan.name} is running")
        inputs.save(directory, plan.name, wanted, None)
        self.save()
        config_path = stage_config(plan, record.attempts, directory, port)
        summary_path(directory, plan).unlink(missing_ok=True)  # an old attempt's summary is not this one's
        log_file = directory / "logs" / f"{plan.name}.log"
        code = run_stage(plan, config_path, log_file, lambda p: self.progress(plan, p), self.stop, self.lock)
        record.summary = read_summary(directory, plan) or None
        if plan.kind == "eval" and record.summary and record.summary.get("benchmarks"):
            status.eval = eval_table(record.summary)  # a failed eval keeps the scored benchmarks
        stopped = self.stop.requested or code in EXIT_STOPPED_BY_SIGNAL
        # A stop that lands as the stage finishes does not undo its commit.
        if (code == 0 or stopped) and stage_committed(plan):
            record.state, record.completion_time = "Succeeded", now()
            record.artifact_uri = f"{plan.output_uri}/{FINAL_ARTIFACT[plan.kind]}"
            if plan.kind == "eval" and record.summary:
                status.eval = eval_table(record.summary)
            inputs.save(directory, plan.name, wanted, inputs.commit_id(plan))
            self.save()
            self.display.finished(plan, record)
            return None
        status.current_stage = None
        if stopped:
            why = self.stop.name if self.stop.requested else "the stage was stopped by a signal"
            record.state, record.message = "Pending", f"stopped on request ({why})"
            status.phase = "Suspended"
            set_condition(status, "Suspended", True, "Interrupted",
                          f"{why} during {plan.name}; run again to resume it")
            set_condition(status, "Ready", False, "Interrupted", f"stopped during {plan.name}")
        else:
            record.state, record.failures = "Failed", record.failures + 1
            record.message = (record.summary or {}).get("error") or f"exit status {code}; see {log_file}"
            status.phase = "Failed"
            set_condition(status, "Failed", True, "StageFailed", f"stage {plan.name} failed: {record.message}")
            set_condition(status, "Ready", False, "StageFailed", record.message)
        self.save()
        if stopped:
            self.display.stopped(plan, record, tail(log_file))
            return self.stop.exit_code if self.stop.requested else 128 + signal.SIGINT
        self.display.failed(plan, record, tail(log_file))
        return 1

    def stopped_before(self, plan: StagePlan) -> int:
        status = self.status
        status.phase, status.current_stage = "Suspended", None
        set_condition(status, "Suspended", True, "Interrupted",
                      f"{self.stop.name} before {plan.name} started; run again to continue")
        set_condition(status, "Ready", False, "Interrupted", f"stopped before {plan.name}")
        self.save()
        self.display.stopped_before(plan, self.stop.name)
        return self.stop.exit_code

    def progress(self, plan: StagePlan, p: StageProgress) -> None:
        """The display, and the status's live progress (as the operator keeps it), every 2 s."""
        self.display.progress(plan, p)
        if time.monotonic() - self._progress_saved < 2.0 or not p.step:
            return
        self._progress_saved = time.monotonic()
        self.status.progress = Progress(stage=plan.name, step=p.step, total_steps=p.total, reward=p.reward,
                                        completion_length=p.completion_length, updated_at=now())
        self.save()
