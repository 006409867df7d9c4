"""When an attempt's Job may go: the operator's finalizer and its own TTL. Pure.

Every attempt's Job carries ``naming.JOB_FINALIZER`` from its creation. A Job deleted
after it finished (a user's ``kubectl delete``, a cleanup script, the run's TTL) then
stays, with its pods unless it was deleted in the foreground, until the run's status
records what it did: a success and its exit summary, or a failure counted toward the
stage's backoffLimit. Without it, a Job gone before the operator read it looked like
one never created, and was created again under the same name: a finished stage ran
again, and a failed attempt deleted during its retry backoff was never counted.

``releasable`` names the deleted Jobs whose finalizer can go, judged against the status
as written; ``ttl_due`` the Jobs that get their stage's ``ttlSecondsAfterFinished`` now.
A Job is created without it and given it once its outcome is recorded: the TTL
controller deletes in the foreground, pods first, and would take the exit summary with
them while the operator is down. (The TTL still counts from the Job's finish.)
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..api import StageStatus, VisionR1RunStatus
from .observe import JobView

TERMINAL = ("Succeeded", "Failed")


def outcome_recorded(job: JobView, records: Mapping[str, StageStatus]) -> bool:
    """Whether ``status`` holds what this finished Job did (or nothing ever will)."""
    record = records.get(job.stage)
    if record is None:
        return True  # its stage is no longer in the run: there is nothing to record it in
    if job.attempt < record.attempts:
        return True  # a later attempt started: this one was counted when it did
    return job.attempt == record.attempts and record.state in TERMINAL


def releasable(status: VisionR1RunStatus, jobs: Iterable[JobView]) -> list[str]:
    """Deleted Jobs whose finalizer the operator removes now.

    A finished Job once its outcome is in the status; a Job deleted before it finished at
    once (there is nothing to record: the attempt is lost and started again). The
    finalizer is removed only from a Job being deleted, not as soon as it could be: that
    would be one more write per stage transition, and a Job nobody deletes needs none.
    """
    records = {r.name: r for r in status.stages}
    names = []
    for job in jobs:
        if not (job.finalizer and job.deleting):
            continue
        if job.state not in TERMINAL or outcome_recorded(job, records):
            names.append(job.name)
    return sorted(names)


def ttl_due(jobs: Iterable[JobView], status: VisionR1RunStatus, ttl: Mapping[str, int | None]) -> dict[str, int]:
    """Finished Jobs whose outcome is recorded and whose stage has a TTL they lack: name -> seconds."""
    records = {r.name: r for r in status.stages}
    due = {}
    for job in jobs:
        seconds = ttl.get(job.stage)
        if seconds is None or job.ttl == seconds or job.deleting or job.state not in TERMINAL:
            continue
        if outcome_recorded(job, records):
            due[job.name] = seconds
    return dict(sorted(due.items()))
