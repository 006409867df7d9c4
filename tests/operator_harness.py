"""A Kubernetes API over HTTP in the test process, and the operator running against it.

Not a test module. ``Cluster`` is kmock's ``KubernetesEmulator`` plus what kopf and the
operator need of a real API server: uid, resourceVersion, generation and
creationTimestamp on every object (kopf's patches test the resourceVersion), the status
subresource kept apart from the rest, and the discovery of every resource the operator
touches. The emulator runs no controllers, so the tests play them: ``JobPlayer`` is the
Job controller and the kubelet (it creates a Job's pods, with the trainer's termination
message, and moves the Job's status along), ``collect_garbage`` is the garbage
collector. ``running_operator`` runs kopf, unmodified, in the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import kmock
import kopf
from kmock._internal import rendering
from kmock._internal.enums import action

from visionr1_operator.api import GROUP, KIND, PLURAL, VERSION
from visionr1_operator.cluster.controller import OperatorConfig
from visionr1_operator.cluster.handlers import register
from visionr1_operator.cluster.naming import ANNOTATION_COMPLETION_INDEX, CONTAINER, LABEL_JOB_NAME
from visionr1_operator.cluster.metrics import OperatorMetrics
from visionr1_operator.cluster.reconcile import ReconcileSettings

RUNS = f"{GROUP}/{VERSION}/{PLURAL}"
RESOURCES = {
    RUNS: dict(kind=KIND, namespaced=True, subresources={"status"}),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    # kopf's namespace observer waits for namespaces in discovery before any watch starts.
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
WRITES = {"POST", "PATCH", "PUT", "DELETE"}


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _DirectRoutes(kmock.RawHandler):
    """Serve the emulator's own Kubernetes routes without kmock's request matching.

    kmock finds the reaction for a request by testing it against every request logged so
    far (its filters are views over the log), which makes each request slower than the
    last: quadratic, and seconds per request after a few thousand. The emulator's default
    reactions are known by action, so they are called directly; anything else (discovery,
    reactions a test adds) still goes through the matching. Sits between
    ``KubernetesEmulator`` and ``RawHandler`` in the MRO of ``Cluster``.
    """

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        routes = {
            action.LIST: self._serve_list, action.WATCH: self._serve_watch, action.FETCH: self._serve_fetch,
            action.CREATE: self._serve_create, action.UPDATE: self._serve_update, action.DELETE: self._serve_delete,
        }
        serve = routes.get(request.action) if request.resource is not None else None
        if serve is not None and request.resource in self._resources:
            return await rendering.Response(payload=serve)(request)
        return await super()._handle(request)


class Cluster(kmock.KubernetesEmulator, _DirectRoutes):
    """kmock's emulator with the object metadata a real API server maintains."""

    keep_history: int | None = None  # versions kept per object (None: all, for assertions)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1)
        self._by_resource: dict[Any, dict[tuple, Any]] = {}  # resource -> (namespace, name) -> object
        for resource, info in RESOURCES.items():
            self.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        if request.resource is not None and request.action in (action.CREATE, action.UPDATE):
            self._stamp(request)
        try:
            return await super()._handle(request)
        finally:
            if request.resource is not None and request.action == action.CREATE and isinstance(request.data, dict):
                meta = request.data.get("metadata", {})
                key = (request.namespace or meta.get("namespace"), meta.get("name"))
                obj = self._objects._objects.get((request.resource, *key))
                if obj is not None:
                    self._by_resource.setdefault(request.resource, {})[key] = obj
            if self.keep_history and request.name and request.action == action.UPDATE:
                self._trim((request.resource, request.namespace, request.name))

    def _get_resources(self) -> list:
        """The declared resources (kmock also scans every stored object for theirs)."""
        return list(self._resources)

    def _stamp(self, request: kmock.Request) -> None:
        """Add server-maintained metadata to a create or patch body, in place.

        In place: kmock routes a request by its identity, so it cannot be replaced.
        """
        data, rv = request.data, str(next(self._rv))
        if request.action == action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_iso())
            meta["generation"], meta["resourceVersion"] = 1, rv
            return
        current = self._current(request)
        generation = (current or {}).get("metadata", {}).get("generation", 1)
        if isinstance(data, list):  # a JSON patch (kopf's finalizer changes)
            for op in data:  # optimistic concurrency: a stale resourceVersion is a 422, as kopf expects
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion":
                    if current is None or op.get("value") != current["metadata"].get("resourceVersion"):
                        raise kmock.KubernetesError(status=422, reason="Invalid", message="the object has been modified")
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            if any(str(op.get("path", "")).startswith("/spec") for op in data):
                data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})
            return
        if not isinstance(data, dict):
            return
        if request.subresource == "status":  # the status subresource writes status only
            for key in [k for k in data if k != "status"]:
                del data[key]
        elif "spec" in data and current is not None and data["spec"] != current.get("spec"):
            data.setdefault("metadata", {})["generation"] = generation + 1
        if data.get("metadata", {}) is not None:
            data.setdefault("metadata", {})["resourceVersion"] = rv

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list:
        """The emulator's object lookup, by key when the request names one object.

        kmock scans every stored object for every request (it overrides a private method
        of ``KubernetesEmulator``, hence the mangled name); with thousands of objects a
        single create or patch takes milliseconds, which would be charged to the operator.
        """
        if request.name is not None and request.resource is not None and (strict or request.namespace):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [obj] if obj is not None else []
        return self._scan(request, strict)

    def _scan(self, request: kmock.Request, strict: bool) -> list:
        """Objects of one resource (a list or watch), from the per-resource index."""
        out = []
        for (namespace, name), obj in self._by_resource.get(request.resource, {}).items():
            namespace_ok = namespace == request.namespace if strict else request.namespace in (None, namespace)
            if namespace_ok and request.name in (None, name):
                out.append(obj)
        return out

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def _trim(self, key) -> None:
        if key in self.objects:
            history = list(self.objects[key].history)
            if len(history) > self.keep_history:
                self.objects[key].history = history[-self.keep_history:]


class Api:
    """The tests' client: reads the emulator's memory, writes over HTTP (so watches see it)."""

    def __init__(self, cluster: Cluster, url: str):
        self.cluster, self.url = cluster, url

    # --- reading --------------------------------------------------------------------------

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        out = []
        for (res, ns, _), obj in list(self.cluster.objects.items()):
            if f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource and not obj.deleted:
                if namespace is None or ns == namespace:
                    out.append(copy.deepcopy(obj.raw))
        return sorted(out, key=lambda o: o["metadata"].get("creationTimestamp", "") + o["metadata"]["name"])

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects(resource, namespace) if o["metadata"]["name"] == name), None)

    def run(self, name: str, namespace: str = "default") -> dict[str, Any]:
        run = self.get(RUNS, namespace, name)
        assert run is not None, f"no run {namespace}/{name}"
        return run

    def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.run(name, namespace).get("status") or {}

    def jobs(self, namespace: str = "default") -> list[dict[str, Any]]:
        return self.objects("batch/v1/jobs", namespace)

    def job_names(self, namespace: str = "default") -> list[str]:
        return [j["metadata"]["name"] for j in self.jobs(namespace)]

    def requests(self, since: int = 0) -> list[kmock.Request]:
        return list(self.cluster)[since:]

    def writes(self, since: int = 0, user_agent: str = "kopf") -> list[kmock.Request]:
        """Write requests made by the operator (kopf's client), not by the test."""
        return [
            r for r in self.requests(since)
            if r.method.value in WRITES and r.headers.get("User-Agent", "").startswith(user_agent)
        ]

    # --- writing --------------------------------------------------------------------------

    @staticmethod
    def _path(resource: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = await self.cluster.request(method, path, json=body)
        async with response:
            data = await response.json(content_type=None)
            assert response.status < 400, f"{method} {path}: {response.status} {data}"
            return data

    async def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        info = self.cluster.resources.get(resource)
        namespace = obj["metadata"].get("namespace", "default") if info is None or info.namespaced else None
        return await self._call("POST", self._path(resource, namespace), obj)

    async def patch(self, resource: str, namespace: str, name: str, patch: dict, sub: str | None = None) -> dict:
        return await self._call("PATCH", self._path(resource, namespace, name, sub), patch)

    async def delete(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("DELETE", self._path(resource, namespace, name))

    async def collect_garbage(self) -> list[str]:
        """Play the garbage collector: delete what an owner that no longer exists owned."""
        alive = {
            obj.raw["metadata"].get("uid") for obj in self.cluster.objects.values() if not obj.deleted
        }
        deleted = []
        for resource in ("batch/v1/jobs", "v1/configmaps", "v1/services", "v1/pods"):
            for obj in self.objects(resource):
                owners = [o["uid"] for o in obj["metadata"].get("ownerReferences") or []]
                if owners and not set(owners) & alive:
                    await self.delete(resource, obj["metadata"]["namespace"], obj["metadata"]["name"])
                    deleted.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return deleted

    async def wait_for(self, check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        """Poll ``check`` until it is truthy; a KeyError/IndexError (not written yet) means not yet."""
        deadline, last_error = time.monotonic() + timeout, None
        while True:
            try:
                value = check()
            except (KeyError, IndexError) as exc:
                value, last_error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or check} (last error: {last_error!r})")
            await asyncio.sleep(0.02)

    async def wait_job(self, name: str, namespace: str = "default", timeout: float = 10.0) -> dict[str, Any]:
        return await self.wait_for(lambda: self.get("batch/v1/jobs", namespace, name), timeout, f"Job {name}")

    async def wait_phase(self, run: str, phase: str, namespace: str = "default", timeout: float = 10.0) -> dict:
        return await self.wait_for(
            lambda: self.status(run, namespace).get("phase") == phase and self.run(run, namespace),
            timeout, f"run {run} in phase {phase}",
        )


class JobPlayer:
    """The Job controller and the kubelet for the operator's Jobs: pods, exits, Job status."""

    def __init__(self, api: Api):
        self.api = api

    async def start(self, job: str, namespace: str = "default") -> None:
        obj = await self.api.wait_job(job, namespace)
        pods = int(obj["spec"].get("parallelism", 1))
        await self.api.patch("batch/v1/jobs", namespace, job, {"status": {"startTime": now_iso(), "active": pods}}, "status")

    async def running_pod(self, job: str, metrics_port: int, namespace: str = "default") -> None:
        """A running rank-0 pod whose metrics port is ``metrics_port`` on 127.0.0.1."""
        obj = await self.api.wait_job(job, namespace)
        pod = self._pod(obj, 0, {"phase": "Running", "podIP": "127.0.0.1"})
        for port in pod["spec"]["containers"][0].get("ports", []):
            if port["name"] == "metrics":
                port["containerPort"] = metrics_port
        await self.api.create("v1/pods", pod)

    async def succeed(self, job: str, summary: dict[str, Any] | None = None, namespace: str = "default") -> None:
        obj = await self.api.wait_job(job, namespace)
        message = json.dumps(summary) if summary is not None else ""
        for index in range(int(obj["spec"].get("completions", 1))):
            await self._exited(obj, index, 0, message if index == 0 else "")
        now = now_iso()
        await self.api.patch("batch/v1/jobs", namespace, job, {"status": {
            "active": 0, "succeeded": obj["spec"].get("completions", 1), "completionTime": now,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now},
            ],
        }}, "status")

    async def fail(
        self, job: str, *, exit_code: int = 1, error: str | None = "RuntimeError: boom",
        reason: str = "BackoffLimitExceeded", message: str = "Job has reached the specified backoff limit",
        namespace: str = "default",
    ) -> None:
        obj = await self.api.wait_job(job, namespace)
        await self._exited(obj, 0, exit_code, json.dumps({"error": error}) if error else "")
        now = now_iso()
        await self.api.patch("batch/v1/jobs", namespace, job, {"status": {
            "active": 0, "failed": 1,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
            ],
        }}, "status")

    async def suspend_by_queue(self, job: str, suspend: bool, namespace: str = "default") -> None:
        """Kueue admitting (False) or preempting (True) a Job: its spec.suspend and condition."""
        await self.api.patch("batch/v1/jobs", namespace, job, {"spec": {"suspend": suspend}})
        condition = {"type": "Suspended", "status": str(suspend), "reason": "JobSuspended" if suspend else "JobResumed",
                     "lastTransitionTime": now_iso()}
        await self.api.patch("batch/v1/jobs", namespace, job, {"status": {
            "conditions": [condition], "active": 0 if suspend else 1, **({} if suspend else {"startTime": now_iso()}),
        }}, "status")

    def _pod(self, job: dict[str, Any], index: int, status: dict[str, Any]) -> dict[str, Any]:
        template = copy.deepcopy(job["spec"]["template"])
        name = job["metadata"]["name"]
        labels = {**template["metadata"].get("labels", {}), LABEL_JOB_NAME: name, "job-name": name}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{name}-{index}-{uuid.uuid4().hex[:5]}", "namespace": job["metadata"]["namespace"],
                "labels": labels, "annotations": {ANNOTATION_COMPLETION_INDEX: str(index)},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                     "uid": job["metadata"]["uid"], "controller": True}],
            },
            "spec": template["spec"],
            "status": status,
        }

    async def _exited(self, job: dict[str, Any], index: int, exit_code: int, message: str) -> None:
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": CONTAINER, "state": {"terminated": terminated}}],
        }
        await self.api.create("v1/pods", self._pod(job, index, status))


def run_manifest(name: str, namespace: str = "default", **spec_overrides: Any) -> dict[str, Any]:
    """A small valid run: every stage enabled (bridge, sft, ptst-1, ptst-2, eval), S3 storage."""
    spec: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct", "tokenSecret": {"name": "hf-token"}},
        "storage": {"uri": "s3://vr1/runs", "credentialsSecret": "s3-credentials",
                    "endpoint": "http://minio.storage:9000", "region": "us-east-1"},
        "image": "registry.example.com/visionr1/trainer:test",
        "data": {
            "bridgeSource": {"source": "s3://vr1/sources/bridge"},
            "rl": {"source": "Osilly/Vision-R1-rl"},
            "benchmarks": [{"name": "mathvista", "format": "mathvista",
                            "data": {"source": "AI4Math/MathVista", "split": "testmini"}}],
        },
        "stages": {
            "bridge": {"multimodalModel": {"backend": "openai", "endpoint": "https://api.example.com/v1",
                                           "model": "gpt-4o", "apiKeySecret": {"name": "openai", "key": "key"}},
                       "reasoningModel": {"backend": "vllm", "model": "deepseek-ai/DeepSeek-R1"},
                       "backoffLimit": 1},
            "sft": {"backoffLimit": 1},
            "grpo": {"backoffLimit": 1},
            "ptst": [{"maxCompletionLength": 64, "numGenerations": 8, "steps": 3},
                     {"maxCompletionLength": 128, "numGenerations": 4, "steps": 3}],
            "eval": {"backoffLimit": 0},
        },
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def test_config(**reconcile: Any) -> OperatorConfig:
    settings = dict(default_image="visionr1/trainer:test", retry_base_seconds=0.2, retry_max_seconds=1.0)
    settings.update(reconcile)
    return OperatorConfig(reconcile=ReconcileSettings(**settings), progress_interval=0.2, error_backoff=0.1)


@contextlib.asynccontextmanager
async def cluster_api(keep_history: int | None = None) -> AsyncIterator[Api]:
    cluster = Cluster()
    cluster.keep_history = keep_history
    async with cluster, kmock.Server(cluster) as server:
        yield Api(cluster, str(server.url))


@contextlib.asynccontextmanager
async def running_operator(
    api: Api, config: OperatorConfig | None = None, metrics: OperatorMetrics | None = None,
    liveness_endpoint: str | None = None,
    options: tuple[kopf.OperatorSettings, dict[str, Any]] | None = None,
) -> AsyncIterator[kopf.Memo]:
    """kopf, unmodified, against the emulator over HTTP, in its own thread and event loop.

    Its own loop, as in production: kopf treats every task of its loop as its own and, when
    it stops, waits for and then cancels them, which would include the emulator's.
    ``options`` are ``__main__.kopf_options`` of some command line (scope, scanning,
    peering); by default a cluster-wide, standalone operator.
    """
    registry = register(kopf.OperatorRegistry())

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=api.url)

    kopf.on.login(registry=registry)(login)
    memo = kopf.Memo(config=config or test_config(), metrics=metrics or OperatorMetrics())
    settings, run_options = options or (kopf.OperatorSettings(), dict(clusterwide=True, standalone=True))
    run_options = {**run_options, "liveness_endpoint": liveness_endpoint}
    # kopf waits this long for the watch to show its own last patch; when the operator
    # stops right after one (every test ends so), the wait only slows the test down.
    settings.persistence.consistency_timeout = 0.5
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=kopf.run, name="operator", daemon=True,
        kwargs=dict(registry=registry, settings=settings, memo=memo, stop_flag=stop, ready_flag=ready, **run_options),
    )
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    try:
        yield memo
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "the operator did not stop"
