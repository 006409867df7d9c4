"""The I/O around ``reconcile.decide``: one controller per run, woken by what changes.

A kopf daemon runs ``RunController.serve`` for every VisionR1Run. Each loop it gathers
the inputs of ``decide`` (the spec from kopf's live body, the run's Jobs from kopf's
index, pod reports of finished attempts, scraped progress), calls it, and carries out
the decision: create one attempt's objects, suspend or resume a Job, patch the status
(one merge patch, only when something changed) and post Events. Then it sleeps until a
Job of the run or the run itself changes, a retry is due, or progress is due a scrape.

The controller is the only writer of its run's status and keeps the last status it wrote
in memory, so a reconcile never acts on a stale copy of its own writes; after a restart
it starts from the stored status and the Jobs that exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import kopf
from pydantic import ValidationError

from visionr1_trainer.config import WIRE

from ..api import StageStatus, VisionR1Run, VisionR1RunStatus
from ..manifest import ManifestError, validate_document
from .admission import Policy, admission_problems
from .jobs import build_stage_objects
from .kube import API_CONCURRENCY, APIError, ForeignObject, Kube, refusal_message
from .metrics import OperatorMetrics
from .naming import JOB_FINALIZER, Owner
from .observe import JobView, PodReport, metrics_endpoint, observe_job, parse_time, pod_report, pods_of
from .outcomes import outcome_recorded, releasable, ttl_due
from .progress import Scraper, parse_progress, same_progress
from .reconcile import TERMINAL, Decision, Observed, PlannedRun, ReconcileSettings, current_stage, decide, plan_run
from .status import finished_generation_patch, merge_patch, status_document

RunKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorConfig:
    """Settings of the operator process (its command-line flags)."""

    reconcile: ReconcileSettings
    progress_interval: float = 30.0  # seconds between scrapes of a running stage's metrics
    scrape_timeout: float = 3.0
    error_backoff: float = 2.0  # first delay after a failed reconcile; doubles up to a minute
    policy: Policy = field(default_factory=Policy)  # what runs may ask for (--allow-* flags)


@dataclass
class Operator:
    """Shared by every run's controller: configuration, API access, metrics, wake-ups."""

    config: OperatorConfig
    settings: kopf.OperatorSettings
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    _controllers: dict[RunKey, RunController] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scraper = Scraper(self.config.scrape_timeout)
        self.api_slots = asyncio.Semaphore(API_CONCURRENCY)  # every controller's API calls, together

    def job_changed(self, namespace: str, run: str, job: JobView) -> None:
        """Wake a run's controller when one of its Jobs changed from what it last acted on."""
        controller = self._controllers.get((namespace, run))
        if controller is not None and controller.seen_jobs.get(job.name) != job:
            controller.wake.set()

    async def job_event(self, namespace: str, run: str, job: JobView) -> None:
        """A Job event: wake its run's controller, or let go of a Job no run will record.

        A deleted run's Jobs are deleted by the garbage collector; one that still carries
        the operator's finalizer (it had not finished, or its outcome was not recorded yet)
        is released here, since no controller of that run exists any more to do it.
        """
        self.job_changed(namespace, run, job)
        if (namespace, run) in self._controllers or not (job.finalizer and job.deleting):
            return
        kube = Kube(self.settings, logging.getLogger(__name__), self.metrics.api_request, self.api_slots)
        body = await kube.get_run(namespace, run)
        meta = (body or {}).get("metadata") or {}
        if body is not None and meta.get("uid") == job.owner_uid and not meta.get("deletionTimestamp"):
            records = {r.name: r for r in parse_status(body.get("status"), logging.getLogger(__name__)).stages}
            if job.state in TERMINAL and not outcome_recorded(job, records):
                return  # its run lives: its controller records the outcome, then releases it
        await kube.remove_job_finalizer(namespace, job.name, JOB_FINALIZER)

    def run_changed(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """Wake a run's controller when its spec or lifecycle changed (not for its own status writes)."""
        controller = self._controllers.get((namespace, name))
        if controller is not None and controller.spec_changed(body):
            controller.wake.set()

    async def acknowledge_if_finished(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """A finished run's daemon has returned: its spec edits are acknowledged here."""
        patch = finished_generation_patch(body) if (namespace, name) not in self._controllers else None
        if patch is not None:
            await Kube(self.settings, logging.getLogger(__name__), self.metrics.api_request,
                       self.api_slots).patch_run_status(
                namespace, name, patch)

    async def serve_run(
        self, body: kopf.Body, jobs_index: kopf.Index, stopped: kopf.DaemonStopped, logger: Any
    ) -> None:
        key = (body.metadata.namespace or "default", body.metadata.name or "")
        controller = RunController(self, body, jobs_index, logger)
        self._controllers[key] = controller
        try:
            await controller.serve(stopped)
        finally:
            if self._controllers.get(key) is controller:
                del self._controllers[key]
            if stopped.is_set() and stopped.reason and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
                self.metrics.observe_run(key, None)

    async def close(self) -> None:
        await self.scraper.close()


class StaleConfig(Exception):
    """An attempt's ConfigMap exists with a config other than the attempt's."""


def parse_run(body: Mapping[str, Any]) -> tuple[VisionR1Run | None, list[tuple[str, str]]]:
    """The run as the pydantic model (status left out: the controller keeps its own)."""
    doc = {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
    doc["metadata"] = dict(doc["metadata"] or {})
    try:
        return validate_document(doc, source=doc["metadata"].get("name", "<run>")), []
    except ManifestError as exc:
        return None, [(p[len("spec."):] if p.startswith("spec.") else p, m) for p, m in exc.problems]


def parse_status(raw: Mapping[str, Any] | None, logger: Any) -> VisionR1RunStatus:
    try:
        return VisionR1RunStatus.model_validate(dict(raw or {}), **WIRE)
    except ValidationError as exc:
        # A status this version cannot read: start over; the Jobs that exist are adopted.
        logger.warning("Ignoring an unreadable status (%s problems); rebuilding it from the Jobs.", exc.error_count())
        return VisionR1RunStatus()


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RunController:
    """The reconcile loop of one run; lives as long as the run's kopf daemon."""

    def __init__(self, operator: Operator, body: kopf.Body, jobs_index: kopf.Index, logger: Any):
        self.op = operator
        self.body = body  # kopf's live view: updated in place on every watch event
        self.jobs_index = jobs_index
        self.logger = logger
        self.key: RunKey = (body.metadata.namespace or "default", body.metadata.name or "")
        self.wake = asyncio.Event()
        self.kube = Kube(operator.settings, logger, on_request=operator.metrics.api_request, slots=operator.api_slots)
        self.status = parse_status(body.get("status"), logger)
        # The status as stored, the base of the next merge patch (defaults included: a
        # field the model defaults but the object lacks, such as a first phase, is written).
        self._written: dict[str, Any] = _plain(body.get("status"))
        self._spec_seen: Any = None
        self._parsed: tuple[Any, VisionR1Run | None, list, PlannedRun | None] = (None, None, [], None)
        self.seen_jobs: dict[str, JobView] = {}  # the Jobs as the last reconcile saw them
        self._created: dict[str, JobView] = {}  # our Jobs that kopf's index has not shown yet
        self._suspends: dict[str, bool] = {}  # suspend patches the index has not shown yet
        self._workload_active: dict[str, bool] = {}  # Job name -> its Kueue Workload's spec.active, as set
        self._workload_retry: float | None = None  # a Workload Kueue has not created yet: look again
        self._reports: dict[str, PodReport] = {}
        # Attempts whose objects the API server refused, by Job name: (its message, when).
        self._refused: dict[str, tuple[str, datetime]] = {}
        self._released: set[str] = set()  # Jobs whose finalizer this controller removed
        self._ttl_set: set[str] = set()  # Jobs this controller gave their TTL
        self._next_scrape = 0.0
        self._errors = 0

    # --- the loop -------------------------------------------------------------------------

    async def serve(self, stopped: kopf.DaemonStopped) -> None:
        while not stopped.is_set():
            self.wake.clear()
            started = time.monotonic()
            try:
                delay, finished = await self.reconcile_once()
                self._errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an API error, a rejected object: log, count, retry
                delay, finished = self._failed_reconcile(exc), False
            self.op.metrics.reconcile_seconds.observe(time.monotonic() - started)
            if finished:
                return  # the run is a record now; the daemon ends (and restarts with the operator)
            await self._sleep(stopped, delay)

    def _failed_reconcile(self, exc: Exception) -> float:
        self._errors += 1
        self.op.metrics.reconcile_errors.labels(reason=type(exc).__name__).inc()
        delay = min(60.0, self.op.config.error_backoff * 2 ** (self._errors - 1))
        if isinstance(exc, (APIError, ForeignObject)):
            self.logger.warning("Reconcile failed, retrying in %.0fs: %s", delay, exc)
        else:
            self.logger.exception("Reconcile failed, retrying in %.0fs", delay)
        if self._errors == 1 and isinstance(exc, (APIError, ForeignObject)):
            kopf.event(self.body, type="Warning", reason="ReconcileError", message=str(exc)[:1024])
        return delay

    async def _sleep(self, stopped: kopf.DaemonStopped, delay: float | None) -> None:
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def spec_changed(self, body: Mapping[str, Any]) -> bool:
        return _change_key(body) != self._spec_seen

    # --- one reconcile --------------------------------------------------------------------

    async def reconcile_once(self) -> tuple[float | None, bool]:
        """Observe, decide, act. Returns (seconds until the next look, whether the run is finished)."""
        if self.status.phase in TERMINAL:
            self.op.metrics.observe_run(self.key, self.status.phase)
            patch = finished_generation_patch(self.body)  # edited while no operator ran
            if patch is not None:
                await self.kube.patch_run_status(self.key[0], self.key[1], patch)
            _, _, planned = self._parse()
            self.seen_jobs = self._jobs()
            await self._let_jobs_go(self.seen_jobs, planned)  # after a crash between the two
            return None, True
        if self.body.metadata.get("deletionTimestamp"):
            return None, False  # being deleted: start nothing; kopf stops this loop next
        run, problems, planned = self._parse()
        jobs = self.seen_jobs = self._jobs()
        await self._fetch_reports(jobs)
        now = _now()
        obs = Observed(
            name=self.key[1], namespace=self.key[0], generation=self.body.metadata.get("generation"),
            run=run, problems=problems, status=self.status, jobs=jobs, reports=dict(self._reports),
            now=now, progress=await self._scrape(jobs, now), planned=planned, refused=dict(self._refused),
        )
        decision = decide(obs, self.op.config.reconcile)
        await self._apply(run, decision)
        await self._let_jobs_go(jobs, planned)
        self.op.metrics.observe_run(self.key, self.status.phase)
        return self._next_look(decision, jobs), decision.finished

    async def _let_jobs_go(self, jobs: Mapping[str, JobView], planned: PlannedRun | None) -> None:
        """After the status patch: remove the finalizer of deleted Jobs it records, and give
        the Jobs it records their stage's ttlSecondsAfterFinished."""
        for name in releasable(self.status, jobs.values()):
            if name not in self._released:
                await self.kube.remove_job_finalizer(self.key[0], name, JOB_FINALIZER)
                self._released.add(name)
        ttl = {n: p.ttl_seconds_after_finished for n, p in planned.plans.items()} if planned else {}
        for name, seconds in ttl_due(jobs.values(), self.status, ttl).items():
            if name not in self._ttl_set:
                await self.kube.set_job_ttl(self.key[0], name, seconds)
                self._ttl_set.add(name)
        self._released &= set(jobs)
        self._ttl_set &= set(jobs)

    def _parse(self) -> tuple[VisionR1Run | None, list[tuple[str, str]], PlannedRun | None]:
        self._spec_seen = key = _change_key(self.body)
        if self._parsed[0] != key:  # validating and planning a spec takes milliseconds: do it once
            run, problems = parse_run(self.body)
            planned = plan_run(run, self.op.config.reconcile) if run is not None else None
            refused = admission_problems(list(planned.plans.values()), self.op.config.policy) if planned else []
            if refused:  # outside the admin's policy, or too big: handled as an invalid spec
                run, problems, planned = None, refused, None
            self._parsed = (key, run, problems, planned)
        return self._parsed[1], self._parsed[2], self._parsed[3]

    def _jobs(self) -> dict[str, JobView]:
        """This run's Jobs from kopf's index, plus the ones we just created that it has not seen."""
        uid = self.body.metadata.uid
        indexed: Iterable[JobView] = self.jobs_index.get(self.key, [])
        jobs = {j.name: j for j in indexed if j.owner_uid in (None, uid)}
        for name in list(self._created):
            if name in jobs:
                del self._created[name]
            else:
                jobs[name] = self._created[name]
        for name, suspend in list(self._suspends.items()):
            job = jobs.get(name)
            if job is None or job.state in TERMINAL or (job.state == "Suspended") == suspend:
                del self._suspends[name]
            else:
                jobs[name] = replace(job, state="Suspended" if suspend else "Pending")
        return jobs

    async def _fetch_reports(self, jobs: Mapping[str, JobView]) -> None:
        """Pod reports (exit summary, failure) of finished attempts not yet in the status."""
        open_attempts = {r.name: r.attempts for r in self.status.stages if r.state in ("Pending", "Running")}
        started = {r.name for r in self.status.stages if r.attempts}
        for job in jobs.values():
            if job.state not in TERMINAL or job.name in self._reports:
                continue
            # The latest attempt of a stage in progress, or one the status lost track of.
            if (job.stage in open_attempts and job.attempt >= open_attempts[job.stage]) or job.stage not in started:
                pods = pods_of(await self.kube.list_job_pods(self.key[0], job.name), job.name)
                self._reports[job.name] = pod_report(pods)

    async def _scrape(self, jobs: Mapping[str, JobView], now: datetime):
        """The running stage's progress, read from its rank-0 pod every ``progress_interval``."""
        current = current_stage(self.status.stages)
        job = jobs.get(current.job_name or "") if current is not None else None
        if job is None or job.state != "Running" or time.monotonic() < self._next_scrape:
            return None
        self._next_scrape = time.monotonic() + self.op.config.progress_interval
        pods = pods_of(await self.kube.list_job_pods(self.key[0], job.name), job.name)
        url = metrics_endpoint(pods)
        text = await self.op.scraper.fetch(url) if url else None
        # Parsed in a thread: the page is the tenant's, and the event loop serves every run.
        progress = await asyncio.to_thread(parse_progress, text, self.key[1], current.name, now) if text else None
        return None if same_progress(progress, self.status.progress) else progress

    async def _apply(self, run: VisionR1Run | None, decision: Decision) -> None:
        """Carry out a decision: objects first, the status last (it records what now exists)."""
        if decision.start is not None and run is not None:
            owner = Owner(self.key[1], self.key[0], self.body.metadata.uid or "")
            start = decision.start
            self._refused.pop(start.job_name, None)
            try:
                for _ in range(3):
                    try:
                        await self._create_attempt(owner, run, start)
                        break
                    except StaleConfig:
                        # Attempt N's name holds a ConfigMap made from an older spec (a crash
                        # kept its Job from being created); ConfigMaps are immutable and the
                        # operator deletes nothing: this attempt runs as N+1, under new names.
                        start = decision.start = replace(start, attempt=start.attempt + 1)
                        record = next(r for r in decision.status.stages if r.name == start.plan.name)
                        record.attempts, record.job_name = start.attempt, start.job_name
            except (APIError, ForeignObject) as exc:
                message = refusal_message(exc)
                if message is None:
                    raise
                # Recorded by the next decide (at once): a condition, a retry with backoff.
                self.logger.warning("The API server refused attempt %s of stage %s: %s",
                                    start.attempt, start.plan.name, message)
                self._refused[start.job_name] = (message, _now())
                decision.requeue(0)
        for name, suspend in decision.suspend_jobs.items():
            await self.kube.set_job_suspend(self.key[0], name, suspend)
            self._suspends[name] = suspend
        await self._set_workloads_active(decision.workload_active)
        before, document = self.status, status_document(decision.status)
        patch = merge_patch(self._written, document)
        if patch:
            await self.kube.patch_run_status(self.key[0], self.key[1], patch)
        self.status, self._written = decision.status, document
        for event in decision.events:
            kopf.event(self.body, type=event.type, reason=event.reason, message=event.message[:1024])
        self.op.metrics.observe_stages(before.stages, decision.status.stages, _duration)
        self._forget_reports(decision.status.stages)

    async def _create_attempt(self, owner: Owner, run: VisionR1Run, start: Any) -> None:
        for obj in build_stage_objects(owner, run.spec, start.plan, start.attempt, suspend=start.suspend):
            created = await self._create(obj)
            if obj["kind"] == "Job":
                self._created[start.job_name] = observe_job(created)

    async def _create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create one object of an attempt, or adopt the one a previous operator made.

        An adopted ConfigMap must hold this attempt's config, the one the Job's config-hash
        annotation names: one made from an older spec raises ``StaleConfig`` while no Job
        of that name exists (a Job that exists runs with it already and is adopted as it is).
        """
        created, new = await self.kube.create_or_adopt(obj)
        if new or obj["kind"] != "ConfigMap" or created.get("data") == obj.get("data"):
            return created
        meta = obj["metadata"]
        if await self.kube.exists("batch/v1", "Job", meta["namespace"], meta["name"]):
            return created
        self.logger.warning("ConfigMap %s holds another config than this attempt's (an older spec).", meta["name"])
        raise StaleConfig(meta["name"])

    async def _set_workloads_active(self, wanted: Mapping[str, bool]) -> None:
        """Suspend or resume a queued run through its Job's Kueue Workload (``spec.active``).

        Each Job's Workload is looked up once per value (then remembered); one Kueue has
        not created yet is looked for again shortly. Without Kueue's API a suspend falls
        back to the Job's own field (nothing else would stop it); a resume is left to
        whatever admits the queue's Jobs.
        """
        self._workload_retry = None
        for name, active in wanted.items():
            job = self.seen_jobs.get(name) or self._created.get(name)
            known = self._workload_active.get(name)
            if known == active or job is None or not job.uid:
                continue
            if known is None and active and job.state != "Suspended":
                continue  # running under Kueue: admitted, so its Workload is active
            found = await self.kube.set_workload_active(self.key[0], job.uid, active)
            if found:
                self._workload_active[name] = active
            elif found is None:
                if not active and job.state != "Suspended":
                    await self.kube.set_job_suspend(self.key[0], name, True)
                    self._suspends[name] = True
                self._workload_active[name] = active
            elif not active:
                self._workload_retry = 2.0  # created a moment ago: Kueue makes its Workload next
        for name in [n for n in self._workload_active if n not in self.seen_jobs and n not in self._created]:
            del self._workload_active[name]

    def _forget_reports(self, records: list[StageStatus]) -> None:
        """Keep only the report of an attempt still to be recorded (a retry waiting its turn)."""
        wanted = {r.job_name for r in records if r.state in ("Pending", "Running")}
        for name in [n for n in self._reports if n not in wanted]:
            del self._reports[name]

    def _next_look(self, decision: Decision, jobs: Mapping[str, JobView]) -> float | None:
        delays = [decision.requeue_after] if decision.requeue_after is not None else []
        if self._workload_retry is not None:
            delays.append(self._workload_retry)
        current = current_stage(self.status.stages)
        job = jobs.get(current.job_name or "") if current is not None else None
        if job is not None and job.state == "Running":
            delays.append(max(self._next_scrape - time.monotonic(), 0.0) or self.op.config.progress_interval)
        return min(delays) if delays else None


def _change_key(body: Mapping[str, Any]) -> tuple:
    """What identifies a version of the spec (and the start of a deletion).

    The API server bumps ``metadata.generation`` on every spec change (never for status):
    a cheap key. Without one, the spec itself, copied (kopf's views follow the live body).
    """
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    spec = ("generation", generation) if generation is not None else _plain(body.get("spec"))
    return spec, meta.get("deletionTimestamp")


def _plain(value: Any) -> Any:
    """A deep copy of a (kopf view of a) JSON document as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _duration(record: StageStatus) -> float | None:
    start, end = parse_time(record.start_time), parse_time(record.completion_time)
    return (end - start).total_seconds() if start and end else None
