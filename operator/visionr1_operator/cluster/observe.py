"""Reading a stage attempt back: ``observe_job`` condenses a Job into what the reconcile
needs (``JobView``), ``pod_report`` reads the trainer's exit summary (its termination
message) and the failure cause from a finished attempt's pods. Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Literal, Mapping

from visionr1_trainer.redact import redact

from ..api import KIND
from .naming import (
    ANNOTATION_COMPLETION_INDEX,
    ANNOTATION_CONFIG_HASH,
    CONTAINER,
    JOB_FINALIZER,
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_STAGE,
    RULE_BAD_CONFIG,
    RULE_DISRUPTION,
)

# "Starting": not suspended, but not all of its pods are up yet (waiting for GPUs, being
# scheduled, pulling the image); "Running" once every pod is ready (or done); "Finishing":
# its pods have ended and the Job controller has yet to mark it Complete or Failed.
JobState = Literal["Pending", "Starting", "Running", "Finishing", "Suspended", "Succeeded", "Failed"]
FailureKind = Literal["bad-config", "disruption", "error"]
_RULE_INDEX = re.compile(r"matching FailJob rule at index (\d+)")


@dataclass(frozen=True)
class JobView:
    """What the reconcile needs to know about one attempt's Job."""

    name: str
    stage: str
    attempt: int
    owner_uid: str | None
    state: JobState
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    finished_at: str | None = None
    config_hash: str | None = None
    uid: str | None = None  # finds the Job's Kueue Workload (label kueue.x-k8s.io/job-uid)
    finalizer: bool = False  # still carries JOB_FINALIZER: its outcome may be unrecorded
    deleting: bool = False  # has a deletionTimestamp (held by a finalizer)
    ttl: int | None = None  # spec.ttlSecondsAfterFinished (set once the outcome is recorded)

    @property
    def failure_kind(self) -> FailureKind:
        """Why a failed Job failed, from the podFailurePolicy rule that fired (if one did)."""
        if self.reason == "PodFailurePolicy" and self.message:
            match = _RULE_INDEX.search(self.message)
            if match and int(match.group(1)) == RULE_BAD_CONFIG:
                return "bad-config"
            if match and int(match.group(1)) == RULE_DISRUPTION:
                return "disruption"
        return "error"


def observe_job(job: Mapping[str, Any]) -> JobView:
    """Condense a Job (as listed or watched) into a ``JobView``."""
    meta, spec, status = job.get("metadata", {}), job.get("spec", {}), job.get("status") or {}
    labels = meta.get("labels") or {}
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("kind") == KIND]
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    reason = message = finished = None
    if "Complete" in true:
        state: JobState = "Succeeded"
        finished = status.get("completionTime") or true["Complete"].get("lastTransitionTime")
    elif "Failed" in true:
        state = "Failed"
        reason, message = true["Failed"].get("reason"), true["Failed"].get("message")
        finished = true["Failed"].get("lastTransitionTime")
    elif spec.get("suspend"):
        state = "Suspended"
    elif _finishing(spec, status, true):
        state = "Finishing"
    elif _pods_up(spec, status):
        state = "Running"
    elif status.get("active") or status.get("startTime"):
        state = "Starting"
    else:
        state = "Pending"
    attempt = labels.get(LABEL_ATTEMPT, "")
    return JobView(
        name=meta.get("name", ""),
        stage=labels.get(LABEL_STAGE, ""),
        attempt=int(attempt) if attempt.isdigit() else 0,
        owner_uid=owners[0].get("uid") if owners else None,
        state=state,
        reason=reason,
        message=message,
        start_time=status.get("startTime"),
        finished_at=finished,
        config_hash=(meta.get("annotations") or {}).get(ANNOTATION_CONFIG_HASH),
        uid=meta.get("uid"),
        finalizer=JOB_FINALIZER in (meta.get("finalizers") or []),
        deleting=bool(meta.get("deletionTimestamp")),
        ttl=spec.get("ttlSecondsAfterFinished"),
    )


def _finishing(spec: Mapping[str, Any], status: Mapping[str, Any], true: Mapping[str, Any]) -> bool:
    """The attempt's pods have ended; the Job controller has not marked the Job Complete or Failed yet.

    It first lists an ended pod in ``uncountedTerminatedPods`` (``active`` and ``ready``
    0, ``succeeded`` not yet counted), removes the pod's tracking finalizer, then counts
    it, and a Job whose pods are done carries ``SuccessCriteriaMet`` or ``FailureTarget``
    before ``Complete`` or ``Failed``. Read as waiting for resources, every finished stage
    went back to Pending for a status write of its own; read as running, a stage whose
    pods ran between two of the Job's status updates was written Running a moment before
    Succeeded. The reconcile leaves the stage's record as it is until the outcome.
    """
    if "SuccessCriteriaMet" in true or "FailureTarget" in true:
        return True
    if status.get("active"):
        return False
    want = spec.get("completions") or spec.get("parallelism") or 1
    uncounted = (status.get("uncountedTerminatedPods") or {}).get("succeeded") or []
    return bool(uncounted) or (status.get("succeeded") or 0) >= want


def _pods_up(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Every pod of the attempt is ready or done: the trainer runs, not waits for a node.

    ``status.ready`` counts pods whose Ready condition is true (the kubelet sets it once
    the containers run); ``active`` counts Pending pods as well, and ``startTime`` is
    set as soon as the Job controller creates them. An API server that reports no
    ``ready`` (before Kubernetes 1.29) is read from ``active`` as before.
    """
    if "ready" not in status:
        return bool(status.get("active"))
    want = spec.get("parallelism") or spec.get("completions") or 1
    return (status.get("ready") or 0) + (status.get("succeeded") or 0) >= want


@dataclass(frozen=True)
class PodReport:
    """What a finished attempt's pods said: the trainer's summary, and why a pod failed."""

    summary: dict[str, Any] | None = None
    failure: str | None = None


def pod_report(pods: Iterable[Mapping[str, Any]]) -> PodReport:
    """The exit summary of rank 0 (or any pod that left one) and the first pod failure.

    The summary is the compact JSON the trainer writes to its termination-message file;
    a pod killed before it could write one (OOM, eviction) is described by its
    container's terminated state instead.
    """
    summary: dict[str, Any] | None = None
    failure: str | None = None
    for pod in sorted(pods, key=_completion_index):
        terminated = _trainer_terminated(pod)
        if terminated is None:
            continue
        # The message comes from an image the tenant chose: masked before it can reach the
        # status, a condition or an Event (the trainer masks its own; this is for any other).
        message = terminated.get("message")
        parsed = _parse_summary(redact(message) if message else message)
        if summary is None and parsed is not None:
            summary = parsed
        if failure is None and terminated.get("exitCode", 0) != 0:
            failure = redact(_describe_failure(pod, terminated, parsed))
    return PodReport(summary=summary, failure=failure)


def _completion_index(pod: Mapping[str, Any]) -> int:
    value = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX, "0")
    return int(value) if str(value).isdigit() else 0


def _trainer_terminated(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return state.get("terminated") or last.get("terminated")
    return None


def _parse_summary(message: str | None) -> dict[str, Any] | None:
    if not message:
        return None
    try:
        value = json.loads(message)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _describe_failure(pod: Mapping[str, Any], terminated: Mapping[str, Any], summary: dict | None) -> str:
    name = pod.get("metadata", {}).get("name", "?")
    text = f"pod {name} exited with code {terminated.get('exitCode')}"
    if terminated.get("reason") and terminated.get("reason") != "Error":
        text += f" ({terminated['reason']})"
    if summary and summary.get("error"):
        text += f": {summary['error']}"
    return text


def pods_of(pods: Iterable[Mapping[str, Any]], job: str) -> list[Mapping[str, Any]]:
    """The pods of one Job (a label filter kept client-side as well)."""
    return [p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(LABEL_JOB_NAME) == job]


def metrics_endpoint(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """``http://<ip>:<port>/metrics`` of the running rank-0 pod, read from the pod itself."""
    for pod in sorted(pods, key=_completion_index):
        status = pod.get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in (pod.get("spec") or {}).get("containers") or []:
            if container.get("name") != CONTAINER:
                continue
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    host = status["podIP"]
                    host = f"[{host}]" if ":" in host else host  # IPv6
                    return f"http://{host}:{port['containerPort']}/metrics"
        return None
    return None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
