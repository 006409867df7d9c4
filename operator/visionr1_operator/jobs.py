"""Stage plan -> the Kubernetes objects of one attempt, and reading them back. Pure: no I/O.

One attempt of a stage is a ConfigMap (the stage config JSON the trainer reads), a
``batch/v1`` Job running ``python -m visionr1_trainer <kind> --config ...`` and, when the
stage spans several nodes, a headless Service that gives pod 0 the DNS name torchrun's
rendezvous needs. Every object is named ``<run>-<stage>-<attempt>``, labelled, and owned
by the run, so that deleting the run garbage-collects them and a restarted operator finds
them again by name.

The other direction is here too: ``observe_job`` condenses a Job into what the reconcile
needs (``JobView``), ``pod_report`` reads the trainer's exit summary (its termination
message) and the failure cause from a finished attempt's pods.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Literal, Mapping

from visionr1_trainer.config import SecretKeyRef
from visionr1_trainer.redact import redact

from .api import API_VERSION, KIND, VisionR1RunSpec
from .plan import StagePlan

MANAGED_BY = "visionr1-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "visionr1.io/run"
LABEL_STAGE = "visionr1.io/stage"
LABEL_ATTEMPT = "visionr1.io/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_CONFIG_HASH = "visionr1.io/config-hash"
# Set by the Job controller on every pod (and the Job's selector): how we find an attempt's pods.
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

CONTAINER = "trainer"
CONFIG_DIR = "/etc/visionr1"
CONFIG_KEY = "stage.json"
SCRATCH_DIR = "/scratch"
PVC_ROOT = "/mnt/visionr1/pvc"
RENDEZVOUS_PORT = 29500
# The trainer image runs as this user; runAsNonRoot needs a numeric uid to verify.
RUN_AS_USER = 1000

# podFailurePolicy rules, by index: the Job's failure message names the rule that fired.
RULE_BAD_CONFIG = 0  # exit 2: the trainer cannot use its config, retrying cannot help
RULE_DISRUPTION = 1  # preemption, eviction, node drain: not the application's fault
# The trainer's exit status for an unusable config (visionr1_trainer.runtime.EXIT_BAD_CONFIG;
# not imported: the operator depends on the trainer's config schema only).
EXIT_BAD_CONFIG = 2


@dataclass(frozen=True)
class Owner:
    """The run that owns a stage's objects."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            # Foreground deletion of the run waits for its Jobs (and so their pods) to go.
            "blockOwnerDeletion": True,
        }


# --- names and labels -------------------------------------------------------------------


def job_name(run: str, stage: str, attempt: int) -> str:
    """``<run>-<stage>-<attempt>``: also the ConfigMap's name (at most 51 characters)."""
    return f"{run}-{stage}-{attempt}"


def service_name(job: str) -> str:
    """The headless Service of a multi-node attempt: a DNS-1035 label, so it starts with a letter."""
    return job if job[0].isalpha() else f"vr1-{job}"


def stage_labels(run: str, stage: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: run,
        LABEL_STAGE: stage,
        LABEL_ATTEMPT: str(attempt),
    }


def config_hash(plan: StagePlan) -> str:
    """What decides a stage's outcome: its config (any attempt), image and world size.

    Placement (node selectors, tolerations, priority...) is left out on purpose: moving a
    finished stage's settings for where it ran changes nothing it produced.
    """
    config = {k: v for k, v in plan.config_json().items() if k != "attempt"}
    key = {
        "config": config,
        "image": plan.image,
        "nodes": plan.resources.nodes,
        "gpusPerNode": plan.resources.gpus_per_node,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --- builders ---------------------------------------------------------------------------


def _metadata(owner: Owner, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner.reference()],
    }


def build_config_map(owner: Owner, plan: StagePlan, attempt: int) -> dict[str, Any]:
    """The stage config JSON of one attempt. It holds Secret names, never Secret values."""
    attempt_plan = plan.for_attempt(attempt)
    name = job_name(owner.name, plan.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, name, stage_labels(owner.name, plan.name, attempt)),
        "immutable": True,
        "data": {CONFIG_KEY: config_text(attempt_plan)},
    }


def config_text(plan: StagePlan) -> str:
    """The stage config as its ConfigMap holds it."""
    return json.dumps(plan.config_json(), indent=2, sort_keys=True) + "\n"


def build_service(owner: Owner, plan: StagePlan, attempt: int) -> dict[str, Any] | None:
    """Headless Service for a multi-node attempt (None for one node).

    Pods of an Indexed Job are named ``<job>-<index>`` and, with ``subdomain`` set to this
    Service, resolve as ``<job>-<index>.<service>``: pod 0 is torchrun's master.
    ``publishNotReadyAddresses`` because the rendezvous happens before any pod is ready.
    """
    if plan.resources.nodes <= 1:
        return None
    job = job_name(owner.name, plan.name, attempt)
    labels = stage_labels(owner.name, plan.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(job), labels),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: job},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def build_job(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int, *, suspend: bool) -> dict[str, Any]:
    """The batch/v1 Job of one attempt.

    ``backoffLimit: 0``: the operator, not the Job controller, retries a failed attempt, as
    a new Job whose config carries the next attempt number (the trainer resumes from the
    stage's last committed checkpoint), and for a multi-node stage the whole group restarts
    together, as torchrun's static rendezvous needs. ``podFailurePolicy`` tells the causes
    apart: exit code 2 (unusable config) fails at once, a disruption (preemption, eviction,
    drain) is not the application's fault: one pod is simply replaced, several nodes fail
    the attempt with a rule the operator recognises and retries without counting it.
    """
    r = plan.resources
    name = job_name(owner.name, plan.name, attempt)
    labels = stage_labels(owner.name, plan.name, attempt)
    meta_labels = dict(labels)
    if spec.queue_name:
        meta_labels[LABEL_QUEUE] = spec.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": r.nodes,
        "parallelism": r.nodes,
        "suspend": suspend,
        # Required with podFailurePolicy: a replacement starts once the old pod is gone.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": _failure_rules(multi_node=r.nodes > 1)},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": _pod_spec(owner, spec, plan, attempt),
        },
    }
    if r.nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if plan.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = plan.active_deadline_seconds
    if plan.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = plan.ttl_seconds_after_finished
    metadata = _metadata(owner, name, meta_labels)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(plan)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def build_stage_objects(
    owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int, *, suspend: bool
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order: the Job last, so its pods find the rest."""
    objects = [build_config_map(owner, plan, attempt)]
    service = build_service(owner, plan, attempt)
    if service is not None:
        objects.append(service)
    objects.append(build_job(owner, spec, plan, attempt, suspend=suspend))
    return objects


def _failure_rules(multi_node: bool) -> list[dict[str, Any]]:
    # The order matters: a failed Job's message names the index of the rule that fired.
    return [
        {  # RULE_BAD_CONFIG
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_CONFIG]},
        },
        {  # RULE_DISRUPTION
            # One node: the Job controller replaces the pod and the stage resumes in the
            # same attempt. Several: the peers of a lost pod cannot go on, so the attempt
            # fails with this rule and the operator restarts the group without counting it.
            "action": "FailJob" if multi_node else "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        },
    ]


def _pod_spec(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int) -> dict[str, Any]:
    r = plan.resources
    job = job_name(owner.name, plan.name, attempt)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        # A namespace with many Services would otherwise flood the environment.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,  # a mounted PVC becomes writable for the trainer
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(owner, spec, plan, attempt)],
        "volumes": _volumes(job, plan),
    }
    if r.nodes > 1:
        pod["subdomain"] = service_name(job)
    if r.service_account_name:
        pod["serviceAccountName"] = r.service_account_name
    if r.priority_class_name:
        pod["priorityClassName"] = r.priority_class_name
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in r.tolerations]
    if r.affinity:
        # Only what the manifest said: empty lists and unset terms stay out of the pod.
        pod["affinity"] = r.affinity.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if r.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in r.image_pull_secrets]
    return pod


def _container(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int) -> dict[str, Any]:
    config = plan.config
    ports = []
    if config.metrics_port:
        ports.append({"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"})
    if plan.resources.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(plan),
        "env": stage_env(owner, spec, plan, attempt),
        "resources": _resources(plan),
        "volumeMounts": _volume_mounts(plan),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        # The trainer writes its JSON exit summary here; the operator copies it into status.
        "terminationMessagePath": config.termination_message_path,
        "terminationMessagePolicy": "File",
    }
    if ports:
        container["ports"] = ports
    return container


def uses_torchrun(plan: StagePlan) -> bool:
    """SFT and GRPO train data-parallel: one process per GPU, across nodes, under torchrun.

    Bridge and eval generate with vLLM, which spreads a model over the GPUs itself
    (tensor parallelism): one process per pod.
    """
    r = plan.resources
    return plan.kind in ("sft", "grpo") and r.nodes * max(r.gpus_per_node, 1) > 1


def trainer_command(plan: StagePlan) -> list[str]:
    entry = ["-m", "visionr1_trainer", plan.kind, "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]
    if not uses_torchrun(plan):
        return ["python", *entry]
    r = plan.resources
    nproc = max(r.gpus_per_node, 1)
    if r.nodes == 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", *entry]
    # Static rendezvous on pod 0; $(VAR) is expanded by the kubelet from the container's env.
    return [
        "torchrun",
        "--nnodes=$(NNODES)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        *entry,
    ]


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_env(name: str, ref: SecretKeyRef | tuple[str, str], optional: bool = False) -> dict[str, Any]:
    secret, key = (ref.name, ref.key) if isinstance(ref, SecretKeyRef) else ref
    selector: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        selector["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": selector}}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def stage_env(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int) -> list[dict[str, Any]]:
    """The container's environment. Secrets are referenced (secretKeyRef), never copied."""
    env = [
        _env("VISIONR1_RUN", owner.name),
        _env("VISIONR1_STAGE", plan.name),
        _env("VISIONR1_ATTEMPT", str(attempt)),
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _env("VISIONR1_WORK_DIR", f"{SCRATCH_DIR}/work"),
        _env("VISIONR1_CACHE_DIR", f"{SCRATCH_DIR}/cache"),
        _env("PYTHONUNBUFFERED", "1"),
    ]
    storage = spec.storage
    if storage.credentials_secret:
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", (storage.credentials_secret, "AWS_ACCESS_KEY_ID")),
            _secret_env("AWS_SECRET_ACCESS_KEY", (storage.credentials_secret, "AWS_SECRET_ACCESS_KEY")),
            _secret_env("AWS_SESSION_TOKEN", (storage.credentials_secret, "AWS_SESSION_TOKEN"), optional=True),
        ]
    if storage.endpoint:
        env.append(_env("AWS_ENDPOINT_URL_S3", storage.endpoint))
    if storage.region:
        env.append(_env("AWS_REGION", storage.region))
    if pvc_claims(plan):
        env.append(_env("VISIONR1_PVC_ROOT", PVC_ROOT))
    if spec.model.token_secret:
        env.append(_secret_env("HF_TOKEN", spec.model.token_secret))
    env += _api_key_env(plan)
    if plan.resources.nodes > 1:
        env += _rendezvous_env(owner, plan, attempt)
    return env


def _api_key_env(plan: StagePlan) -> list[dict[str, Any]]:
    """API keys of the bridge generators and the eval judge, each under its own name."""
    config = plan.config
    refs: list[tuple[str, SecretKeyRef | None]] = []
    if plan.kind == "bridge":
        refs = [
            ("VISIONR1_BRIDGE_MULTIMODAL_API_KEY", config.bridge.multimodal_model.api_key_secret),
            ("VISIONR1_BRIDGE_REASONING_API_KEY", config.bridge.reasoning_model.api_key_secret),
        ]
    elif plan.kind == "eval" and config.eval.judge is not None:
        refs = [("VISIONR1_JUDGE_API_KEY", config.eval.judge.api_key_secret)]
    return [_secret_env(name, ref) for name, ref in refs if ref is not None]


def _rendezvous_env(owner: Owner, plan: StagePlan, attempt: int) -> list[dict[str, Any]]:
    r = plan.resources
    job = job_name(owner.name, plan.name, attempt)
    return [
        # Pod 0 of the Indexed Job, through the headless Service (same namespace).
        _env("MASTER_ADDR", f"{job}-0.{service_name(job)}"),
        _env("MASTER_PORT", str(RENDEZVOUS_PORT)),
        _env("NNODES", str(r.nodes)),
        _env("NPROC_PER_NODE", str(max(r.gpus_per_node, 1))),
        # torchrun derives each worker's RANK and WORLD_SIZE (= NNODES x NPROC_PER_NODE)
        # from these; a pod-level WORLD_SIZE would mislead one-process stages.
        _field_env("NODE_RANK", f"metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"),
    ]


def _resources(plan: StagePlan) -> dict[str, Any]:
    r = plan.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu is not None:
        requests["cpu"] = limits["cpu"] = str(r.cpu)
    if r.memory is not None:
        requests["memory"] = limits["memory"] = str(r.memory)
    if r.gpus_per_node:
        requests[r.gpu_resource] = limits[r.gpu_resource] = str(r.gpus_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pvc_claims(plan: StagePlan) -> list[str]:
    """Every PVC the stage reads or writes: storage, model and data sources (``pvc://claim/...``)."""
    claims: set[str] = set()
    for value in _strings(plan.config_json()):
        if value.startswith("pvc://"):
            claims.add(value[len("pvc://"):].split("/", 1)[0])
    return sorted(claims)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _volumes(job: str, plan: StagePlan) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": job, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        # NCCL and data-loader workers share tensors through /dev/shm (64Mi by default).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(plan.resources.shared_memory)}},
        {"name": "scratch", "emptyDir": {}},
    ]
    for i, claim in enumerate(pvc_claims(plan)):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
    return volumes


def _volume_mounts(plan: StagePlan) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    for i, claim in enumerate(pvc_claims(plan)):
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"})
    return mounts


# --- reading Jobs and pods back ---------------------------------------------------------

JobState = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
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
    elif status.get("active") or status.get("ready") or status.get("startTime"):
        state = "Running"
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
    )


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
