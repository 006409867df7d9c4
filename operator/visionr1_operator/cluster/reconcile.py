"""The reconcile of one run: observed state in, actions and the new status out. Pure.

``decide`` is the whole control logic of the operator. It reads the run's spec, the
status the operator wrote last, the Jobs that exist for the run, what the pods of a
finished attempt reported and the latest scraped progress, and returns what to do
(start one attempt, suspend or resume a Job, post Events, look again after a delay)
together with the status to write. The I/O around it (``controller.py``) only gathers
the inputs and carries out the result, so every scenario (retries, suspension, spec
changes, a restart that finds Jobs the status does not know about) is a plain function
call in the tests.

Where the status and the Jobs disagree, the Jobs win: a Job of a later attempt than the
status records is adopted (the status patch was lost to a crash; the failures of the
attempts it skipped are counted from their Jobs, which the operator's finalizer keeps
until then), and a Job the status names but that does not exist is created again under
the same name. A create the API server refuses (an admission webhook or policy, a quota
on Jobs) is retried with the stage's backoff and fails the stage after its backoffLimit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Mapping

from ..api import Progress, StageStatus, VisionR1Run, VisionR1RunStatus, eval_table
from ..plan import StagePlan, build_plan
from .jobs import config_hash
from .naming import job_name
from .observe import JobView, PodReport, parse_time
from .status import get_condition, set_condition, timestamp

TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class ReconcileSettings:
    """Operator-wide knobs of the reconcile (flags of ``python -m visionr1_operator``)."""

    default_image: str
    retry_base_seconds: float = 10.0  # first retry after a failed attempt; doubles each time
    retry_max_seconds: float = 300.0
    disruption_retry_seconds: float = 0.0  # a disrupted attempt restarts at once


@dataclass(frozen=True)
class PlannedRun:
    """A valid run with its stage plans and their config hashes: computed once per spec."""

    run: VisionR1Run
    plans: dict[str, StagePlan]  # in execution order
    hashes: dict[str, str]  # stage name -> jobs.config_hash


def plan_run(run: VisionR1Run, settings: ReconcileSettings) -> PlannedRun:
    plans = {p.name: p for p in build_plan(run, settings.default_image)}
    return PlannedRun(run=run, plans=plans, hashes={name: config_hash(p) for name, p in plans.items()})


@dataclass(frozen=True)
class Observed:
    """Everything ``decide`` looks at, gathered by the controller."""

    name: str
    namespace: str
    generation: int | None
    run: VisionR1Run | None  # None when the spec does not validate
    problems: list[tuple[str, str]]  # (field path, message) when it does not
    status: VisionR1RunStatus
    jobs: Mapping[str, JobView]  # this run's Jobs, by name
    reports: Mapping[str, PodReport]  # pod reports of finished attempts, by Job name
    now: datetime
    progress: Progress | None = None  # freshly scraped from the running stage, if any
    planned: PlannedRun | None = None  # ``plan_run(run)``, when the caller keeps it between calls
    # Attempts whose objects the API server refused to create, by Job name: (its message, when).
    refused: Mapping[str, tuple[str, datetime]] = field(default_factory=dict)


@dataclass(frozen=True)
class StartAttempt:
    """Create the objects of one attempt (``jobs.build_stage_objects``)."""

    plan: StagePlan
    attempt: int
    suspend: bool  # created suspended: Kueue admits it

    @property
    def job_name(self) -> str:
        return job_name(self.plan.config.run, self.plan.name, self.attempt)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    status: VisionR1RunStatus
    start: StartAttempt | None = None
    suspend_jobs: dict[str, bool] = field(default_factory=dict)  # Job name -> spec.suspend
    # Under a queueName: Job name -> its Kueue Workload's spec.active (Kueue owns spec.suspend).
    workload_active: dict[str, bool] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until a retry is due

    @property
    def finished(self) -> bool:
        return self.status.phase in TERMINAL

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def decide(obs: Observed, settings: ReconcileSettings) -> Decision:
    """The actions and the new status for one run."""
    out = Decision(status=copy_status(obs.status))
    if out.status.phase in TERMINAL:
        return out  # a finished run is a record; nothing acts on it any more
    if obs.run is None:
        _hold_invalid(obs, out)
        return out
    run = obs.run
    planned = obs.planned or plan_run(run, settings)
    plans = planned.plans
    refused = refused_changes(out.status.stages, plans, planned.hashes)
    if not refused:
        out.status.stages = _align(out.status.stages, list(plans.values()))
    stages_with_jobs = {j.stage for j in obs.jobs.values()}
    for record in out.status.stages:
        if record.state in ("Pending", "Running") and (record.attempts or record.name in stages_with_jobs):
            _track(record, plans.get(record.name), obs, settings, out, can_retry=not (refused or run.spec.suspend))
    current = current_stage(out.status.stages)
    if current is not None and not refused and not run.spec.suspend:
        _start_if_needed(current, plans.get(current.name), run, obs, out)
    _suspend_or_resume(current, run, obs, out)
    _summarize(current, run, refused, obs, out)
    return out


def copy_status(status: VisionR1RunStatus) -> VisionR1RunStatus:
    """A copy ``decide`` may change: its records, conditions and progress are new objects.

    Not a deep copy (pydantic's is slow): the summaries and eval results are shared, and
    ``decide`` only ever replaces them, never changes them in place.
    """
    return status.model_copy(update={
        "stages": [r.model_copy() for r in status.stages],
        "conditions": [c.model_copy() for c in status.conditions],
        "progress": status.progress.model_copy() if status.progress is not None else None,
    })


def current_stage(records: list[StageStatus]) -> StageStatus | None:
    """The first stage not yet succeeded (a failed one included), or None when all have."""
    return next((r for r in records if r.state != "Succeeded"), None)


# --- spec changes ------------------------------------------------------------------------


def refused_changes(
    records: list[StageStatus], plans: Mapping[str, StagePlan], hashes: Mapping[str, str]
) -> list[str]:
    """Spec changes that would rewrite history: a finished stage's settings, a started stage's removal.

    Changes to stages that have not started apply (they are planned afresh on every
    reconcile); a running stage's changes apply from its next attempt.
    """
    problems = []
    for record in records:
        plan = plans.get(record.name)
        if record.state == "Succeeded" and plan is None:
            problems.append(f"stage {record.name} has finished and can no longer be removed from the spec")
        elif record.state == "Succeeded" and record.config_hash and hashes[record.name] != record.config_hash:
            problems.append(
                f"stage {record.name} has finished: its settings (or the model, storage, data or "
                "image it used) can no longer change"
            )
        elif record.attempts and plan is None:
            problems.append(f"stage {record.name} has started and cannot be removed; suspend the run instead")
    return problems


def _align(records: list[StageStatus], plans: list[StagePlan]) -> list[StageStatus]:
    """One record per planned stage, in plan order; new stages start Pending."""
    by_name = {r.name: r for r in records}
    return [by_name.get(p.name) or StageStatus(name=p.name, kind=p.kind) for p in plans]


# --- one stage's attempts ----------------------------------------------------------------


def _track(
    record: StageStatus, plan: StagePlan | None, obs: Observed, settings: ReconcileSettings,
    out: Decision, can_retry: bool,
) -> None:
    """Bring a started stage's record up to date with its latest attempt's Job."""
    latest = max((j for j in obs.jobs.values() if j.stage == record.name), key=lambda j: j.attempt, default=None)
    if latest is not None and latest.attempt > record.attempts:  # a status patch was lost
        # The attempts it skipped failed and were retried; their failures went with the lost
        # patch. Their Jobs still exist (the finalizer holds them until this is recorded).
        record.failures += sum(
            1 for j in obs.jobs.values()
            if j.stage == record.name and record.attempts <= j.attempt < latest.attempt
            and j.state == "Failed" and j.failure_kind == "error"
        )
        record.attempts, record.job_name = latest.attempt, latest.name
        record.config_hash = latest.config_hash or record.config_hash
        record.start_time = record.start_time or latest.start_time or timestamp(obs.now)
    job = obs.jobs.get(record.job_name or "")
    if job is None and record.job_name in obs.refused:
        _refused(record, plan, obs, settings, out, can_retry)
        return
    if job is None:
        return  # not created yet, or deleted: _start_if_needed creates it under the same name
    if job.state == "Succeeded":
        report = obs.reports.get(job.name) or PodReport()
        record.state = "Succeeded"
        record.completion_time = job.finished_at or timestamp(obs.now)
        record.artifact_uri = plan.output_uri if plan is not None else record.artifact_uri
        record.summary = report.summary
        record.message = None
        if record.kind == "eval" and report.summary:  # the benchmark table, as the local executor shows it
            out.status.eval = eval_table(report.summary)
    elif job.state == "Failed":
        _failed(record, plan, job, obs, settings, out, can_retry)
    elif job.state == "Finishing":
        return  # its pods have ended: the outcome follows within moments, recorded in one write
    else:
        # Running once every pod is up: a Job whose pods wait for a node is not running yet.
        record.state = "Running" if job.state == "Running" else "Pending"
        record.message = None if job.state != "Suspended" else record.message


def _failed(
    record: StageStatus, plan: StagePlan | None, job: JobView, obs: Observed,
    settings: ReconcileSettings, out: Decision, can_retry: bool,
) -> None:
    """A failed attempt: retry it (after a backoff) or fail the stage, and say why."""
    report = obs.reports.get(job.name) or PodReport()
    if record.kind == "eval" and report.summary and report.summary.get("benchmarks"):
        out.status.eval = eval_table(report.summary)  # the benchmarks that were scored stay shown
    why = describe_failure(job, report)
    kind = job.failure_kind
    if kind == "bad-config":
        _fail_stage(record, job, obs, f"attempt {job.attempt} could not use its config (not retried): {why}", report)
        return
    counted = record.failures + (1 if kind == "error" else 0)
    limit = plan.backoff_limit if plan is not None else 0
    if counted > limit:
        record.failures = counted
        message = f"failed {counted} times (backoffLimit {limit}); last: attempt {job.attempt}: {why}"
        _fail_stage(record, job, obs, message, report)
        return
    cause = "was disrupted (node disruption or preemption, not counted)" if kind == "disruption" else "failed"
    delay = settings.disruption_retry_seconds if kind == "disruption" else retry_delay(counted, settings)
    failed_at = parse_time(job.finished_at) or obs.now
    due = failed_at + timedelta(seconds=delay)
    record.state = "Running"
    if not can_retry or plan is None:
        record.message = f"attempt {job.attempt} {cause}: {why}; the retry waits"
        return
    if obs.now < due:
        record.message = f"attempt {job.attempt} {cause}: {why}; attempt {job.attempt + 1} starts at {timestamp(due)}"
        out.requeue((due - obs.now).total_seconds())
        return
    record.failures = counted
    record.message = f"attempt {job.attempt} {cause}: {why}"
    out.events.append(Event(
        "Warning", "StageRetrying", f"stage {record.name}: {record.message}; starting attempt {job.attempt + 1}"
    ))
    _begin_attempt(record, plan, job.attempt + 1, obs, out)


def _refused(
    record: StageStatus, plan: StagePlan | None, obs: Observed, settings: ReconcileSettings,
    out: Decision, can_retry: bool,
) -> None:
    """The API server refused the attempt's objects: retry after a backoff, counted as a failure."""
    server_message, refused_at = obs.refused[record.job_name or ""]
    counted = record.failures + 1
    limit = plan.backoff_limit if plan is not None else 0
    what = f"the API server refused to create attempt {record.attempts} (Job {record.job_name}): {server_message}"
    if counted > limit:
        record.failures = counted
        record.state = "Failed"
        record.completion_time = timestamp(obs.now)
        record.message = f"{what} ({counted} times, backoffLimit {limit})"
        return
    due = refused_at + timedelta(seconds=retry_delay(counted, settings))
    record.state = "Pending"
    if not can_retry or plan is None:
        record.message = f"{what}; the retry waits"
        return
    if obs.now < due:
        record.message = f"{what}; retrying at {timestamp(due)}"
        out.requeue((due - obs.now).total_seconds())
        return
    record.failures = counted
    record.message = what
    out.events.append(Event("Warning", "CreateRefused", f"stage {record.name}: {what}; retrying"))
    out.start = StartAttempt(plan=plan, attempt=record.attempts, suspend=bool(obs.run and obs.run.spec.queue_name))


def _fail_stage(record: StageStatus, job: JobView, obs: Observed, message: str, report: PodReport) -> None:
    record.state = "Failed"
    record.completion_time = job.finished_at or timestamp(obs.now)
    record.message = message
    record.summary = report.summary


def retry_delay(failures: int, settings: ReconcileSettings) -> float:
    """Exponential backoff: base, 2 x base, 4 x base ... up to the maximum."""
    return min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** max(failures - 1, 0))


def describe_failure(job: JobView, report: PodReport) -> str:
    """One line: the Job's failure reason, then what the failing pod (or trainer) said."""
    parts = [f"{job.reason or 'Failed'}: {job.message}" if job.message else (job.reason or "Failed")]
    if report.failure:
        parts.append(report.failure)
    return "; ".join(parts)


def _begin_attempt(record: StageStatus, plan: StagePlan, attempt: int, obs: Observed, out: Decision) -> None:
    run = obs.run
    out.start = StartAttempt(plan=plan, attempt=attempt, suspend=bool(run and run.spec.queue_name))
    record.attempts = attempt
    record.job_name = out.start.job_name
    record.config_hash = config_hash(plan)
    record.state = "Pending"  # Running once its pods are (observe_job)
    record.start_time = record.start_time or timestamp(obs.now)
    out.status.progress = Progress(stage=record.name)


def _start_if_needed(
    record: StageStatus, plan: StagePlan | None, run: VisionR1Run, obs: Observed, out: Decision
) -> None:
    """Start the current stage, or create its latest attempt's Job again if it went missing."""
    if out.start is not None or plan is None or record.state == "Failed":
        return
    if record.attempts == 0:
        _begin_attempt(record, plan, 1, obs, out)
    elif record.job_name not in obs.jobs and record.job_name not in obs.refused:
        out.start = StartAttempt(plan=plan, attempt=record.attempts, suspend=bool(run.spec.queue_name))


# --- suspension ----------------------------------------------------------------------------


def _suspend_or_resume(current: StageStatus | None, run: VisionR1Run, obs: Observed, out: Decision) -> None:
    """spec.suspend on the run suspends its running Job; false resumes it.

    With a queueName, Kueue owns the Job's suspend field: it admits (unsuspends) the Job
    and may suspend it again to preempt it, which is no failure. Patching the Job would
    fight Kueue (its job reconciler starts any suspended Job whose Workload is still
    admitted, and every round kills all pods), so a queued run is suspended through its
    Workload: ``spec.active: false`` makes Kueue evict it and suspend the Job itself, and
    ``true`` lets Kueue admit it again. The operator never unsuspends a queued Job.
    """
    job = obs.jobs.get(current.job_name or "") if current is not None else None
    if job is None or job.state in TERMINAL or (out.start and out.start.job_name == job.name):
        return
    if run.spec.queue_name:
        out.workload_active[job.name] = not run.spec.suspend
        if run.spec.suspend:
            current.state = "Pending"
        return
    if run.spec.suspend and job.state != "Suspended":
        out.suspend_jobs[job.name] = True
        current.state = "Pending"
    elif not run.spec.suspend and job.state == "Suspended":
        out.suspend_jobs[job.name] = False
        current.state = "Running"


# --- phase and conditions -----------------------------------------------------------------


def _phase(current: StageStatus | None, records: list[StageStatus], run: VisionR1Run) -> str:
    if current is None:
        return "Succeeded" if records else "Pending"
    if current.state == "Failed":
        return "Failed"
    if run.spec.suspend:
        return "Suspended"
    if not any(r.attempts for r in records) or current.state == "Pending":
        return "Pending"
    return "Running"


def _summarize(current: StageStatus | None, run: VisionR1Run, refused: list[str], obs: Observed, out: Decision) -> None:
    status = out.status
    status.phase = _phase(current, status.stages, run)
    status.current_stage = current.name if current is not None else None
    if obs.generation is not None:
        status.observed_generation = obs.generation
    if obs.progress is not None and current is not None and obs.progress.stage == current.name:
        status.progress = obs.progress
    job = obs.jobs.get(current.job_name or "") if current is not None else None
    waiting = _waiting_reason(current, job, run, obs)
    ready, ready_reason, ready_message = _readiness(current, run, refused, status.phase, waiting)
    conditions = _conditions(status, current, refused, ready, ready_reason, ready_message)
    for type_, value, reason, message, event in conditions:
        flipped = set_condition(status.conditions, type_, value, reason, message, obs.now, obs.generation)
        if event is not None and flipped and value:
            out.events.append(event)
    if _flipped_off(obs.status, status, "Suspended"):
        out.events.append(Event("Normal", "Resumed", "run resumed"))


def _waiting_reason(current: StageStatus | None, job: JobView | None, run: VisionR1Run, obs: Observed) -> str | None:
    """Why a started stage is not running: its create was refused, Kueue holds it, or its pods wait."""
    if current is None or current.state != "Pending" or not current.attempts:
        return None
    if job is None and current.job_name in obs.refused:
        return "CreateRefused"
    if (job is not None and job.state == "Suspended") or (job is None and run.spec.queue_name):
        return "Queued"
    return "WaitingForResources"


def _readiness(
    current: StageStatus | None, run: VisionR1Run, refused: list[str], phase: str, waiting: str | None = None,
) -> tuple[bool, str, str]:
    if phase == "Succeeded":
        return True, "Succeeded", "every stage succeeded"
    if phase == "Failed":
        return False, "Failed", f"stage {current.name} failed"
    if refused:
        return False, "FinishedStageChanged", "; ".join(refused)
    if phase == "Suspended":
        return False, "Suspended", "spec.suspend is true"
    if waiting == "CreateRefused" and current is not None:
        return False, "CreateRefused", current.message or f"the API server refused Job {current.job_name}"
    if waiting == "WaitingForResources" and current is not None:
        return False, "WaitingForResources", (
            f"stage {current.name}'s Job {current.job_name} waits for its pods to start "
            "(a node with the resources it asks for, scheduling, the image)")
    if current is not None and current.state == "Pending" and current.attempts:
        where = f" in queue {run.spec.queue_name}" if run.spec.queue_name else ""
        return False, "Queued", f"stage {current.name}'s Job {current.job_name} waits for admission{where}"
    if current is not None and current.message:
        return False, "RetryBackoff", current.message
    if current is not None and current.state == "Running":
        return True, "StageRunning", f"stage {current.name} is running (Job {current.job_name})"
    return False, "Pending", "no stage has started yet"


def _conditions(
    status: VisionR1RunStatus, current: StageStatus | None, refused: list[str],
    ready: bool, ready_reason: str, ready_message: str,
) -> list[tuple[str, bool, str, str, Event | None]]:
    phase = status.phase
    n = len(status.stages)
    failed_message = f"stage {current.name}: {current.message}" if phase == "Failed" and current else ""
    refused_message = "; ".join(refused)
    return [
        ("Ready", ready, ready_reason, ready_message, None),
        ("Succeeded", phase == "Succeeded", "AllStagesSucceeded" if phase == "Succeeded" else phase,
         f"all {n} stages succeeded" if phase == "Succeeded" else f"run is {phase}",
         Event("Normal", "Succeeded", f"all {n} stages succeeded")),
        ("Failed", phase == "Failed", "StageFailed" if phase == "Failed" else "NoFailure",
         failed_message, Event("Warning", "StageFailed", failed_message)),
        ("Suspended", phase == "Suspended", "SuspendedByUser" if phase == "Suspended" else "NotSuspended",
         "spec.suspend is true" if phase == "Suspended" else "",
         Event("Normal", "Suspended", "run suspended: no new stage starts and the running Job is suspended")),
        ("InvalidSpec", bool(refused), "FinishedStageChanged" if refused else "SpecValid",
         refused_message, Event("Warning", "SpecChangeRefused", refused_message)),
    ]


def _flipped_off(old: VisionR1RunStatus, new: VisionR1RunStatus, type_: str) -> bool:
    before, after = get_condition(old.conditions, type_), get_condition(new.conditions, type_)
    return before is not None and before.status == "True" and after is not None and after.status == "False"


def _hold_invalid(obs: Observed, out: Decision) -> None:
    """An invalid spec starts nothing; a Job already running goes on (its config was valid)."""
    status = out.status
    message = "; ".join(f"spec.{path}: {msg}" for path, msg in obs.problems)[:32768]
    if not any(r.attempts for r in status.stages):
        status.phase = "Pending"
    if obs.generation is not None:
        status.observed_generation = obs.generation
    set_condition(status.conditions, "Ready", False, "InvalidSpec", message, obs.now, obs.generation)
    for type_ in ("Succeeded", "Failed", "Suspended"):
        if get_condition(status.conditions, type_) is None:
            set_condition(status.conditions, type_, False, "InvalidSpec", "", obs.now, obs.generation)
    if set_condition(status.conditions, "InvalidSpec", True, "SpecInvalid", message, obs.now, obs.generation):
        out.events.append(Event("Warning", "InvalidSpec", message))
