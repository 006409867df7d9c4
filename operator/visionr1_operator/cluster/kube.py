"""The operator's own API calls: create-or-adopt, status and suspend patches, Kueue
Workload activation, pod listing.

They go through kopf's client, the one the watches use: the same authenticated session
(re-login on 401, retries with backoff on 429/5xx/connection errors), so the operator
holds one API client, not two. kopf keeps that client in a private module; this file is
the only place that touches it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import kopf
from kopf._cogs.clients import api as _api
from kopf._cogs.clients import errors as _errors

from ..api import GROUP, PLURAL, VERSION

APIError = _errors.APIError
NotFound = _errors.APINotFoundError

_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("batch/v1", "Job"): "jobs",
}
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
CREATE_BACKOFFS = (0.5, 1.0)
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"  # Kueue puts it on the Workload it makes for a Job
KUEUE_VERSIONS = ("v1beta2", "v1beta1")  # v0.15+ serves both; older releases only v1beta1


# The controllers' API calls in flight at once, all runs together. kopf's client opens a TLS
# connection for every request that finds none idle and keeps it for reuse, each with a
# 256 KiB read buffer and OpenSSL's state: 500 runs reconciling at once held 100 of them
# (about 30 MiB). The calls are short (tens of milliseconds), so 32 at once carry hundreds a
# second; kopf's watches and its own patches do not count here.
API_CONCURRENCY = 32


class ForeignObject(Exception):
    """An object with the name we need exists but belongs to something else."""


def collection_url(api_version: str, kind: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{_PLURALS[(api_version, kind)]}"


def object_url(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{collection_url(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"


def refusal_message(exc: Exception) -> str | None:
    """The API server's words when it refused to create an object for good, else None.

    Refusals: validation (422), admission webhooks and ValidatingAdmissionPolicies (403,
    422, 400, or 500 when a webhook cannot be called), quotas (403), a name held by
    something else (``ForeignObject``). Not refusals: throttling and other server
    errors, which are retried as any failed reconcile is.
    """
    if isinstance(exc, ForeignObject):
        return str(exc)
    if not isinstance(exc, APIError):
        return None
    text = exc.message or str(exc) or f"HTTP {exc.status}"
    if 400 <= exc.status < 500 and exc.status not in (401, 409, 429):
        return text[:2000]
    if exc.status == 500 and "webhook" in text:
        return text[:2000]
    return None


def run_status_url(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


def _same_owner(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    def owner_uids(obj: dict[str, Any]) -> set[str]:
        return {o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences") or []}

    return bool(owner_uids(existing) & owner_uids(wanted))


@dataclass
class Kube:
    """API calls of one run's controller (its logger prefixes the run's name)."""

    settings: kopf.OperatorSettings
    logger: logging.Logger | logging.LoggerAdapter
    on_request: Callable[[str, str], None] = lambda verb, resource: None  # metrics hook
    slots: asyncio.Semaphore | None = None  # shared by every controller: at most API_CONCURRENCY calls at once

    async def _call(self, request: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self.slots is None:
            return await request(*args, settings=self.settings, logger=self.logger, **kwargs)
        async with self.slots:
            return await request(*args, settings=self.settings, logger=self.logger, **kwargs)

    async def create_or_adopt(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create ``obj``; on 409 adopt the existing one if the same run owns it.

        Names are deterministic (``<run>-<stage>-<attempt>``), so an object that already
        exists was created by this operator before a restart or a lost status patch:
        using it, not creating a second, is what makes a restart safe.
        """
        meta = obj["metadata"]
        url = collection_url(obj["apiVersion"], obj["kind"], meta["namespace"])
        self.on_request("create", obj["kind"])
        try:
            # kopf's client retries 403s and 5xx for minutes (API server upgrades); a quota or
            # an admission webhook refusing a create answers the same, so two quick retries
            # here, then the refusal is recorded and retried with the stage's backoff.
            created = await self._call(_api.post, url, payload=obj, backoffs=CREATE_BACKOFFS)
            return created, True
        except _errors.APIConflictError:
            pass
        self.on_request("get", obj["kind"])
        existing = await self._call(_api.get, object_url(obj))
        if not _same_owner(existing, obj):
            raise ForeignObject(
                f"{obj['kind']} {meta['namespace']}/{meta['name']} already exists and is not owned by this run"
            )
        self.logger.info("Adopted the existing %s %s.", obj["kind"], meta["name"])
        return existing, False

    async def patch_run_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.on_request("patch", "VisionR1Run")
        await self._call(_api.patch, run_status_url(namespace, name), payload={"status": patch}, headers=MERGE_PATCH)

    async def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.on_request("patch", "Job")
        url = f"{collection_url('batch/v1', 'Job', namespace)}/{name}"
        await self._call(_api.patch, url, payload={"spec": {"suspend": suspend}}, headers=MERGE_PATCH)

    async def set_workload_active(self, namespace: str, job_uid: str, active: bool) -> bool | None:
        """Set ``spec.active`` on the Kueue Workload of the Job with this UID.

        True once the Workload says ``active``; False when Kueue has not created it yet;
        None when the API server serves no Kueue Workloads (Kueue is not installed).
        """
        selector = quote(f"{LABEL_JOB_UID}={job_uid}")
        for version in KUEUE_VERSIONS:
            collection = f"/apis/kueue.x-k8s.io/{version}/namespaces/{namespace}/workloads"
            self.on_request("list", "Workload")
            try:
                listing = await self._call(_api.get, f"{collection}?labelSelector={selector}")
            except NotFound:
                continue  # this version is not served (an older Kueue), or no Kueue at all
            items = list(listing.get("items") or [])
            for workload in items:
                if (workload.get("spec") or {}).get("active", True) != active:
                    self.on_request("patch", "Workload")
                    await self._call(_api.patch, f"{collection}/{workload['metadata']['name']}",
                                     payload={"spec": {"active": active}}, headers=MERGE_PATCH)
                    self.logger.info("Set spec.active=%s on Kueue Workload %s.", active, workload["metadata"]["name"])
            return bool(items)
        return None

    async def remove_job_finalizer(self, namespace: str, name: str, finalizer: str) -> None:
        """Let a Job go: the operator has recorded its outcome (a Job already gone is fine).

        Read, then a merge patch of the other finalizers (a garbage collector's) guarded by
        the resourceVersion read: one written in between makes it a 409, and it is read again.
        """
        url = f"{collection_url('batch/v1', 'Job', namespace)}/{name}"
        for _ in range(5):
            try:
                self.on_request("get", "Job")
                meta = (await self._call(_api.get, url))["metadata"]
                finalizers = list(meta.get("finalizers") or [])
                if finalizer not in finalizers:
                    return
                self.on_request("patch", "Job")
                await self._call(_api.patch, url, payload={"metadata": {
                    "finalizers": [f for f in finalizers if f != finalizer] or None,
                    "resourceVersion": meta["resourceVersion"],
                }}, headers=MERGE_PATCH)
                return
            except NotFound:
                return
            except _errors.APIConflictError:
                continue
        raise APIError(f"Job {namespace}/{name} kept changing while its finalizer was removed",
                       status=409, headers={})

    async def set_job_ttl(self, namespace: str, name: str, seconds: int) -> None:
        """Give a finished Job its ttlSecondsAfterFinished (the TTL controller deletes it then)."""
        self.on_request("patch", "Job")
        try:
            await self._call(_api.patch, f"{collection_url('batch/v1', 'Job', namespace)}/{name}",
                             payload={"spec": {"ttlSecondsAfterFinished": seconds}}, headers=MERGE_PATCH)
        except NotFound:
            pass

    async def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.on_request("get", kind)
        try:
            await self._call(_api.get, f"{collection_url(api_version, kind, namespace)}/{name}")
        except NotFound:
            return False
        return True

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.on_request("get", "VisionR1Run")
        try:
            return await self._call(_api.get, f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")
        except NotFound:
            return None

    async def list_job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The pods of one Job, selected by the label the Job controller puts on them."""
        self.on_request("list", "Pod")
        selector = quote(f"batch.kubernetes.io/job-name={job}")
        url = f"{collection_url('v1', 'Pod', namespace)}?labelSelector={selector}"
        listing = await self._call(_api.get, url)
        return list(listing.get("items") or [])
