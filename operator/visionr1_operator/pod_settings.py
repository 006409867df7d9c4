"""What cluster users add to a stage's pods: labels, annotations, environment, volumes and
mounts, a scheduler, a runtime class, and RDMA networking (``stages.<stage>.pod``).

Typed and bounded like ``affinity``: no free-form object reaches the pod. Nothing here may
override what the operator itself sets: its labels and annotations (``visionr1.io/``, the
Job controller's ``batch.kubernetes.io/``, ``app.kubernetes.io/managed-by``), the
environment the trainer reads (``RESERVED_ENV``), its volumes (``config``, ``dshm``,
``scratch``, ``tmp``, ``pvc-<n>``) and their mount paths (``RESERVED_PATHS``). Each rule is
a pydantic validator naming the field and a CEL rule the API server enforces.
``cluster/pods.py`` applies the settings; tests/test_pod_settings.py checks that every
name it sets is one these lists reserve.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from visionr1_trainer.schema import DNS_LABEL, DNS_SUBDOMAIN, QUANTITY_PATTERN, CelRule, Schema, raise_problems

# --- what the operator sets (and so a user may not) -----------------------------------------

# Label and annotation keys: these prefixes, and the exact keys below.
RESERVED_KEY_PREFIXES = ("visionr1.io/", "batch.kubernetes.io/")
RESERVED_LABELS = ("app.kubernetes.io/managed-by", "job-name", "controller-uid")
# Environment variables the operator sets on a stage's container (all stages, all options),
# and the ones torchrun sets on its workers.
RESERVED_ENV = (
    "POD_NAME", "POD_NAMESPACE", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
    "HF_TOKEN", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE", "NODE_RANK",
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    # Caches and scratch, so that a read-only root filesystem holds (cluster/pods.py CACHE_ENV).
    "TMPDIR", "HF_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
    "TRITON_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR",
    "FLASHINFER_WORKSPACE_BASE", "MPLCONFIGDIR", "CUDA_CACHE_PATH", "NUMBA_CACHE_DIR",
)
RESERVED_ENV_PREFIX = "VISIONR1_"
RESERVED_VOLUMES = ("config", "dshm", "scratch", "tmp")
RESERVED_VOLUME_PATTERN = r"^pvc-[0-9]+$"  # the PVCs named by pvc:// URIs
# Mount paths of the operator's volumes: a user mount may be none of them, nor inside or above one.
RESERVED_PATHS = ("/etc/visionr1", "/dev/shm", "/scratch", "/tmp", "/mnt/visionr1")

MAX_ITEMS = 32
MAX_KEYS = 64
# A qualified name (labels, annotations): an optional DNS-subdomain prefix and a name.
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_QUALIFIED = re.compile(QUALIFIED_NAME)
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
AnnotationValue = Annotated[str, StringConstraints(max_length=16384)]
# What Kubernetes accepts as an environment variable name (IsEnvVarName).
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# Bounds kept small on purpose: the API server prices every CEL rule by the longest string
# and the longest list it may see, summed over the CRD, and these models sit in every stage.
EnvName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ENV_NAME)]
VolumeName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL)]
ObjectName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=253)]
# An absolute path without empty segments or a trailing slash; "." and ".." are refused below.
PATH = r"^(/[^/]+)+$"
MountPath = Annotated[str, StringConstraints(max_length=256, pattern=PATH)]
SizeLimit = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]


def _key_problems(field: str, keys, *, labels: bool) -> list[tuple[str, str]]:
    problems = []
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if len(key) > 317 or len(name) > 63 or not _QUALIFIED.match(key):
            problems.append((field, f"{key!r} is not a qualified name (an optional DNS-subdomain prefix and "
                                    "'/', then at most 63 of [A-Za-z0-9-_.], starting and ending alphanumeric)"))
        elif key.startswith(RESERVED_KEY_PREFIXES) or (labels and key in RESERVED_LABELS):
            problems.append((field, f"{key!r} is set by the operator or the Job controller; "
                                    f"keys under {', '.join(RESERVED_KEY_PREFIXES)} are reserved"))
    return problems


def _cel_list(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _key_rule(field: str, labels: bool) -> CelRule:
    reserved = f"{_cel_list(RESERVED_KEY_PREFIXES)}.exists(p, k.startsWith(p))"
    if labels:
        reserved += f" || k in {_cel_list(RESERVED_LABELS)}"
    return CelRule(f"self.{field}.all(k, size(k) <= 317 && !({reserved}))",
                   f"{field}: keys under {', '.join(RESERVED_KEY_PREFIXES)} (and the operator's own) are reserved",
                   f".{field}")


# --- environment ----------------------------------------------------------------------------


class KeyRef(Schema):
    name: ObjectName = Field(description="Name of the Secret or ConfigMap.")
    key: Key = Field(description="Key in it.")
    optional: bool = Field(default=False, description="Start even if the key is missing.")


class FieldRef(Schema):
    field_path: str = Field(max_length=256, pattern=r"^[A-Za-z0-9_.\[\]'/-]+$",
                            description="A pod field (metadata.name, status.hostIP, metadata.labels['x']...).")


class EnvVarSource(Schema):
    cel_rules = (CelRule("[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef)].exists_one(x, x)",
                         "valueFrom needs exactly one of secretKeyRef, configMapKeyRef, fieldRef"),)

    secret_key_ref: KeyRef | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(default=None, description="A key of a ConfigMap.")
    field_ref: FieldRef | None = Field(default=None, description="A field of the pod.")

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        set_ = [f for f in ("secret_key_ref", "config_map_key_ref", "field_ref") if getattr(self, f) is not None]
        if len(set_) != 1:
            raise_problems([((), f"needs exactly one of secretKeyRef, configMapKeyRef, fieldRef "
                                          f"(got {len(set_)})")])
        return self


class EnvVar(Schema):
    """An environment variable of the trainer container (core/v1 EnvVar)."""

    cel_rules = (
        CelRule("!(has(self.value) && has(self.valueFrom))", "give value or valueFrom, not both", ".valueFrom"),
        CelRule(f"!(self.name in {_cel_list(RESERVED_ENV)}) && !self.name.startsWith('{RESERVED_ENV_PREFIX}')",
                f"the operator sets this variable (reserved: {RESERVED_ENV_PREFIX}* and the ones the stage pods "
                "document)", ".name"),
    )

    name: EnvName = Field(description="Variable name.")
    value: str | None = Field(default=None, max_length=32768, description="Its value.")
    value_from: EnvVarSource | None = Field(default=None, description="Where its value comes from.")

    @model_validator(mode="after")
    def _rules(self) -> EnvVar:
        problems = []
        if self.value is not None and self.value_from is not None:
            problems.append(("valueFrom", "give value or valueFrom, not both"))
        if self.name in RESERVED_ENV or self.name.startswith(RESERVED_ENV_PREFIX):
            problems.append(("name", f"{self.name} is set by the operator (reserved: {RESERVED_ENV_PREFIX}*, "
                                     f"{', '.join(RESERVED_ENV)})"))
        raise_problems(problems)
        return self


# --- volumes and mounts ---------------------------------------------------------------------


class KeyToPath(Schema):
    key: Key = Field(description="Key of the ConfigMap or Secret.")
    path: str = Field(min_length=1, max_length=1024, pattern=r"^[^/]", description="Relative file path to put it at.")


class ConfigMapVolume(Schema):
    name: ObjectName = Field(description="The ConfigMap.")
    items: list[KeyToPath] = Field(default_factory=list, max_length=MAX_ITEMS, description="Keys to project (default all).")
    optional: bool = Field(default=False, description="Start even if the ConfigMap is missing.")


class SecretVolume(Schema):
    secret_name: ObjectName = Field(description="The Secret.")
    items: list[KeyToPath] = Field(default_factory=list, max_length=MAX_ITEMS, description="Keys to project (default all).")
    optional: bool = Field(default=False, description="Start even if the Secret is missing.")


class PVCVolume(Schema):
    claim_name: ObjectName = Field(description="The PersistentVolumeClaim.")
    read_only: bool = Field(default=False, description="Mount it read-only.")


class EmptyDirVolume(Schema):
    medium: Literal["", "Memory"] = Field(default="", description="'' (node disk) or Memory (tmpfs).")
    # A string with a pattern, not the int-or-string Quantity: its CEL rule, in a list of
    # volumes in every stage, is over the API server's cost budget.
    size_limit: SizeLimit | None = Field(default=None, description="Size limit (a quantity: '100Gi').")


class NFSVolume(Schema):
    server: str = Field(min_length=1, max_length=253, pattern=r"^\S+$", description="NFS server.")
    path: MountPath = Field(description="Exported path.")
    read_only: bool = Field(default=False, description="Mount it read-only.")


class CSIVolume(Schema):
    driver: ObjectName = Field(description="CSI driver name.")
    read_only: bool = Field(default=False, description="Mount it read-only.")
    fs_type: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]+$", description="Filesystem type.")
    volume_attributes: dict[str, Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=dict, max_length=MAX_KEYS, description="Driver-specific attributes.")


_SOURCES = ("persistent_volume_claim", "config_map", "secret", "empty_dir", "nfs", "csi")
_SOURCES_CAMEL = ("persistentVolumeClaim", "configMap", "secret", "emptyDir", "nfs", "csi")


class Volume(Schema):
    """A volume of the stage's pods: exactly one source (a bounded subset of core/v1 Volume)."""

    cel_rules = (
        CelRule("[" + ", ".join(f"has(self.{s})" for s in _SOURCES_CAMEL) + "].exists_one(x, x)",
                f"a volume needs exactly one of {', '.join(_SOURCES_CAMEL)}"),
        CelRule(f"!(self.name in {_cel_list(RESERVED_VOLUMES)}) && !self.name.matches('{RESERVED_VOLUME_PATTERN}')",
                f"the operator's volumes are named {', '.join(RESERVED_VOLUMES)} and pvc-<n>", ".name"),
    )

    name: VolumeName = Field(description="Volume name (a DNS label), referenced by volumeMounts.")
    persistent_volume_claim: PVCVolume | None = Field(default=None, description="A PersistentVolumeClaim.")
    config_map: ConfigMapVolume | None = Field(default=None, description="A ConfigMap.")
    secret: SecretVolume | None = Field(default=None, description="A Secret.")
    empty_dir: EmptyDirVolume | None = Field(default=None, description="An emptyDir.")
    nfs: NFSVolume | None = Field(default=None, description="An NFS export.")
    csi: CSIVolume | None = Field(default=None, description="An inline CSI volume.")

    @model_validator(mode="after")
    def _rules(self) -> Volume:
        problems = []
        set_ = [c for s, c in zip(_SOURCES, _SOURCES_CAMEL) if getattr(self, s) is not None]
        if len(set_) != 1:
            problems.append(((), f"volume {self.name!r} needs exactly one of {', '.join(_SOURCES_CAMEL)}"
                                     f" (got {', '.join(set_) or 'none'})"))
        if self.name in RESERVED_VOLUMES or re.match(RESERVED_VOLUME_PATTERN, self.name):
            problems.append(("name", f"{self.name!r} is one of the operator's volumes "
                                     f"({', '.join(RESERVED_VOLUMES)}, pvc-<n>): choose another name"))
        raise_problems(problems)
        return self


def _path_problem(path: str) -> str | None:
    parts = path.split("/")[1:]
    if any(p in (".", "..") for p in parts):
        return f"{path!r}: '.' and '..' segments are not allowed"
    for reserved in RESERVED_PATHS:
        if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
            return (f"{path!r} is, is inside or holds {reserved}, which the operator mounts "
                    f"(reserved: {', '.join(RESERVED_PATHS)})")
    return None


class VolumeMount(Schema):
    """Where one of ``volumes`` is mounted in the trainer container."""

    cel_rules = (
        CelRule("!self.mountPath.matches('/[.][.]?(/|$)')",
                "mountPath: '.' and '..' segments are not allowed", ".mountPath"),
        CelRule(f"!{_cel_list(RESERVED_PATHS)}.exists(r, self.mountPath == r || "
                "self.mountPath.startsWith(r + '/') || r.startsWith(self.mountPath + '/'))",
                f"mountPath may not be, be inside or hold a path the operator mounts ({', '.join(RESERVED_PATHS)})",
                ".mountPath"),
    )

    name: VolumeName = Field(description="Name of a volume in pod.volumes.")
    mount_path: MountPath = Field(description="Absolute path in the container.")
    sub_path: str | None = Field(default=None, max_length=1024, pattern=r"^[^/]",
                                 description="Path inside the volume to mount instead of its root.")
    read_only: bool = Field(default=False, description="Mount read-only.")

    @model_validator(mode="after")
    def _rules(self) -> VolumeMount:
        problem = _path_problem(self.mount_path)
        problems = [("mountPath", problem)] if problem else []
        if self.sub_path is not None and ".." in self.sub_path.split("/"):
            problems.append(("subPath", f"{self.sub_path!r}: '..' is not allowed"))
        raise_problems(problems)
        return self


# --- RDMA -----------------------------------------------------------------------------------


RDMA_RESOURCE = r"^rdma/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"


class RDMA(Schema):
    """Opt-in RDMA networking (InfiniBand, RoCE) for NCCL across nodes.

    Adds the IPC_LOCK capability (RDMA pins memory; the hardened pod drops every other
    capability) and requests the RDMA device plugin's extended resources. The trainer
    image ships libibverbs, so NCCL uses the devices without falling back to TCP.
    """

    # startsWith, not matches: a regex over a map key (no maxLength) is priced far over budget.
    cel_rules = (CelRule("self.resources.all(k, k.startsWith('rdma/') && size(k) > 5)",
                         "rdma.resources: names are rdma/<name> (the RDMA device plugin's resources)",
                         ".resources"),)

    resources: dict[str, Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=dict, max_length=8,
        description="rdma/* extended resources per pod, as the RDMA device plugin names them "
        "(for example rdma/hca_shared_devices_a: 1); requested and limited alike.",
    )

    @model_validator(mode="after")
    def _names(self) -> RDMA:
        raise_problems([("resources", f"{k!r} is not an rdma/<name> resource")
                        for k in self.resources if not re.match(RDMA_RESOURCE, k)])
        return self


# --- the stage's pod ------------------------------------------------------------------------


def _list_map(key: str) -> dict:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


class PodSettings(Schema):
    """What a cluster adds to this stage's pods, besides what the operator sets."""

    cel_rules = (
        _key_rule("labels", labels=True),
        _key_rule("annotations", labels=False),
        CelRule("self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
                "volumeMounts: each name must be one of pod.volumes", ".volumeMounts"),
    )

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_KEYS, description="Extra pod labels.")
    annotations: dict[str, AnnotationValue] = Field(
        default_factory=dict, max_length=MAX_KEYS, description="Extra pod annotations.")
    # Unique names and paths: list-type map, as core/v1 keys them (no CEL cost: the API
    # server prices every rule of the CRD together, and this schema is in every stage).
    env: list[EnvVar] = Field(default_factory=list, max_length=MAX_ITEMS, json_schema_extra=_list_map("name"),
                              description="Extra environment of the trainer container.")
    volumes: list[Volume] = Field(default_factory=list, max_length=MAX_ITEMS, json_schema_extra=_list_map("name"),
                                  description="Extra volumes.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=MAX_ITEMS, json_schema_extra=_list_map("mountPath"),
        description="Mounts of the extra volumes in the trainer container.")
    scheduler_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN,
                                       description="Scheduler of the pods (default: the cluster's).")
    runtime_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN,
                                           description="RuntimeClass of the pods (for example nvidia).")
    rdma: RDMA | None = Field(default=None, description="Opt in to RDMA networking (IPC_LOCK and rdma/* resources).")

    @model_validator(mode="after")
    def _rules(self) -> PodSettings:
        problems = _key_problems("labels", self.labels, labels=True)
        problems += _key_problems("annotations", self.annotations, labels=False)
        for field, items, attr in (("env", self.env, "name"), ("volumes", self.volumes, "name"),
                                   ("volumeMounts", self.volume_mounts, "mount_path")):
            seen: dict[str, int] = {}
            for i, item in enumerate(items):
                value = getattr(item, attr)
                if value in seen:
                    problems.append((f"{field}[{i}]", f"{value!r} is already used by {field}[{seen[value]}]"))
                seen.setdefault(value, i)
        names = {v.name for v in self.volumes}
        for i, mount in enumerate(self.volume_mounts):
            if mount.name not in names:
                problems.append((f"volumeMounts[{i}].name",
                                 f"{mount.name!r} is not in pod.volumes (known: {sorted(names) or 'none'})"))
        raise_problems(problems)
        return self
