"""The pod template of a stage attempt: container, command, environment, resources, volumes. Pure.

The root filesystem is read-only. What the trainer and its libraries write goes, by
environment (``CACHE_ENV``), to ``/scratch`` (a disk emptyDir sized from the stage, also the
pod's ephemeral-storage request) or ``/tmp`` (memory-backed, ``TMP_SIZE``). The user's
additions (``stages.<stage>.pod``, ``pod_settings.PodSettings``) come after the operator's
and cannot replace them (validation refuses reserved names).
"""

from __future__ import annotations

import math
import re
from typing import Any

from visionr1_trainer.config import SecretKeyRef

from ..api import VisionR1RunSpec
from ..plan import StagePlan, config_strings
from ..pod_settings import PodSettings
from .naming import (
    ANNOTATION_COMPLETION_INDEX,
    CONFIG_DIR,
    CONFIG_KEY,
    CONTAINER,
    PVC_ROOT,
    RENDEZVOUS_PORT,
    RUN_AS_USER,
    SCRATCH_DIR,
    TMP_DIR,
    TMP_SIZE,
    Owner,
    job_name,
    service_name,
)


def pod_spec(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int) -> dict[str, Any]:
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
        "volumes": _volumes(job, plan) + _user_volumes(plan.pod),
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
    if plan.pod.scheduler_name:
        pod["schedulerName"] = plan.pod.scheduler_name
    if plan.pod.runtime_class_name:
        pod["runtimeClassName"] = plan.pod.runtime_class_name
    return pod


def pod_metadata(labels: dict[str, str], plan: StagePlan) -> dict[str, Any]:
    """The pod template's metadata: the user's labels and annotations, then the operator's labels."""
    meta: dict[str, Any] = {"labels": {**plan.pod.labels, **labels}}
    if plan.pod.annotations:
        meta["annotations"] = dict(plan.pod.annotations)
    return meta


def _container(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int) -> dict[str, Any]:
    config = plan.config
    ports = []
    if config.metrics_port:
        ports.append({"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"})
    if plan.resources.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    capabilities: dict[str, list[str]] = {"drop": ["ALL"]}
    if plan.pod.rdma is not None:
        # RDMA registers (pins) memory; IPC_LOCK lifts the locked-memory limit for it.
        capabilities["add"] = ["IPC_LOCK"]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(plan),
        "env": stage_env(owner, spec, plan, attempt) + _user_env(plan.pod),
        "resources": _resources(plan),
        "volumeMounts": _volume_mounts(plan) + _user_mounts(plan.pod),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": capabilities,
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
    config = f"{CONFIG_DIR}/{CONFIG_KEY}"
    entry = ["-m", "visionr1_trainer", plan.kind, "--config", config]
    if not uses_torchrun(plan):
        return ["python", *entry]
    # torchrun reports any worker's failure as exit 1: the config is checked first, so an
    # unusable one exits 2 (podFailurePolicy: fail, no retry) before a worker starts.
    check = ["python", "-m", "visionr1_trainer.launch", plan.kind, "--config", config, "--"]
    r = plan.resources
    nproc = max(r.gpus_per_node, 1)
    if r.nodes == 1:
        return [*check, "torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", *entry]
    # Static rendezvous on pod 0; $(VAR) is expanded by the kubelet from the container's env.
    return [
        *check,
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
        *(_env(k, v) for k, v in cache_env().items()),
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


def cache_env(scratch: str = SCRATCH_DIR, tmp: str = TMP_DIR) -> dict[str, str]:
    """Where every cache and scratch file of the trainer and its libraries goes.

    The root filesystem (HOME included) is read-only: each writer is pointed at /scratch
    (large, on the node's disk, kept for the pod's life: weights, compiled kernels) or /tmp
    (small, in memory). The local executor's test (tests/test_pod_readonly.py) runs a stage
    with these, remapped, under a read-only HOME and checks that nothing is written elsewhere.
    """
    cache = f"{scratch}/cache"
    return {
        "TMPDIR": tmp,  # tempfile, and what defaults to it (torch inductor's /tmp/torchinductor_<user>)
        "PYTHONDONTWRITEBYTECODE": "1",  # site-packages is read-only
        "HF_HOME": f"{scratch}/huggingface",  # the hub client: model weights, tokens, xet cache
        "XDG_CACHE_HOME": cache,  # torch hub, pip, outlines, and anything else XDG-aware
        "XDG_CONFIG_HOME": f"{scratch}/config",
        "VLLM_CACHE_ROOT": f"{cache}/vllm",  # torch.compile artifacts, CUDA graphs metadata
        "VLLM_CONFIG_ROOT": f"{scratch}/config/vllm",  # usage stats, ~/.config/vllm
        "TRITON_HOME": cache,  # ~/.triton
        "TRITON_CACHE_DIR": f"{cache}/triton",  # compiled Triton kernels
        "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",  # default /tmp/torchinductor_<user>
        "TORCH_EXTENSIONS_DIR": f"{cache}/torch_extensions",  # DeepSpeed's JIT ops (default /tmp/torch_extensions)
        "FLASHINFER_WORKSPACE_BASE": cache,  # FlashInfer's JIT kernels (~/.cache/flashinfer)
        "CUDA_CACHE_PATH": f"{cache}/nv",  # the driver's PTX JIT cache (~/.nv/ComputeCache)
        "NUMBA_CACHE_DIR": f"{cache}/numba",  # numba caches beside the source otherwise
        "MPLCONFIGDIR": f"{tmp}/matplotlib",  # matplotlib's font cache (~/.config/matplotlib)
    }


def _user_env(pod: PodSettings) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=False) for e in pod.env]


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
    # What /scratch may hold (its emptyDir's sizeLimit), so the scheduler picks a node with the disk.
    requests["ephemeral-storage"] = scratch_size(plan)
    if plan.pod.rdma is not None:
        for name, count in plan.pod.rdma.resources.items():
            requests[name] = limits[name] = str(count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pvc_claims(plan: StagePlan) -> list[str]:
    """Every PVC the stage reads or writes: storage, model and data sources (``pvc://claim/...``)."""
    claims: set[str] = set()
    for value in config_strings(plan.config_json()):
        if value.startswith("pvc://"):
            claims.add(value[len("pvc://"):].split("/", 1)[0])
    return sorted(claims)


def _volumes(job: str, plan: StagePlan) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": job, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        # NCCL and data-loader workers share tensors through /dev/shm (64Mi by default).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(plan.resources.shared_memory)}},
        {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size(plan)}},
        # The root filesystem is read-only: /tmp is memory, counted in the container's memory.
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": TMP_SIZE}},
    ]
    for i, claim in enumerate(pvc_claims(plan)):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
    return volumes


def _volume_mounts(plan: StagePlan) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    for i, claim in enumerate(pvc_claims(plan)):
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"})
    return mounts


def _user_volumes(pod: PodSettings) -> list[dict[str, Any]]:
    # exclude_defaults: only what the manifest said (an empty items list stays out).
    return [v.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True) | {"name": v.name}
            for v in pod.volumes]


def _user_mounts(pod: PodSettings) -> list[dict[str, Any]]:
    return [m.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True) for m in pod.volume_mounts]


# --- the size of /scratch -----------------------------------------------------------------

GIB = 2**30
# JIT caches (Triton, inductor, FlashInfer, vLLM's compile cache, DeepSpeed ops), logs, data shards.
CACHE_GIB = 20
# Without a parameter count in the model's name (a path, an unusual name).
DEFAULT_SCRATCH = "200Gi"
_PARAMS = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z0-9])")


def model_params(name: str) -> float | None:
    """Parameters in billions, read from a model name (``Qwen2.5-VL-7B-Instruct`` -> 7.0)."""
    found = _PARAMS.findall(name.rsplit("/", 1)[-1])
    return float(found[-1]) if found else None


def scratch_size(plan: StagePlan) -> str:
    """resources.scratchSize, else an estimate from the model's size and what the stage keeps.

    Every stage downloads the model into HF_HOME (its weights, at 2 bytes a parameter in
    bf16, 4 in fp32). SFT and GRPO also save a model and their rank's share of a checkpoint
    in the work directory before they commit it: the weights again, and the optimizer state
    (fp32 master weights and two Adam moments, 12 bytes a parameter) split over the nodes.
    """
    r = plan.resources
    if r.scratch_size is not None:
        return str(r.scratch_size)
    params = model_params(plan.config.model.name)
    if params is None:
        return DEFAULT_SCRATCH
    weight_bytes = 4 if plan.config.model.dtype == "float32" else 2
    weights = params * 1e9 * weight_bytes
    total = weights
    if plan.kind in ("sft", "grpo"):
        total += weights + params * 1e9 * 12 / r.nodes
    return f"{math.ceil(total / GIB) + CACHE_GIB}Gi"
