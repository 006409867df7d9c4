"""stages.<stage>.pod: what cluster users add to a stage's pods, validated three times.

Every refusal is checked in `visionr1 validate` (naming the field), in the CRD harness, and
(tests marked cluster) by the real API server; every setting that validates reaches the
pod of the rendered Job and passes the official Kubernetes schema; and nothing the
operator sets can be overridden: every label, annotation, environment variable, volume and
mount path the operator writes, for every example and option, is one the settings reserve.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import kubernetes_validate
import pytest
from test_validate_invalid import BASE, EXAMPLES, Case, _names, mutated

from crd_harness import cel_errors, structural_errors
from visionr1_operator import pod_settings as ps
from visionr1_operator.api import VisionR1Run
from visionr1_operator.cli import main
from visionr1_operator.cluster import jobs, naming
from visionr1_operator.manifest import load_run
from visionr1_operator.plan import build_plan
from visionr1_trainer.config import WIRE

SFT = "spec.stages.sft"
POD = f"{SFT}.pod"
PVC_VOLUME = {"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-datasets", "readOnly": True}}
MOUNT = {"name": "datasets", "mountPath": "/data"}

CASES = [
    Case("pod-label-reserved", "cel", f"{POD}.labels", "reserved",
         {f"{POD}.labels": {"visionr1.io/stage": "x"}}),
    Case("pod-label-managed-by", "cel", f"{POD}.labels", "set by the operator",
         {f"{POD}.labels": {"app.kubernetes.io/managed-by": "me"}}),
    Case("pod-label-value-too-long", "schema", f"{POD}.labels.team", "at most 63 characters",
         {f"{POD}.labels": {"team": "x" * 64}}),
    Case("pod-label-value-bad", "schema", f"{POD}.labels.team", "should match pattern",
         {f"{POD}.labels": {"team": "a b"}}),
    Case("pod-annotation-reserved", "cel", f"{POD}.annotations", "reserved",
         {f"{POD}.annotations": {"batch.kubernetes.io/job-completion-index": "3"}}),
    Case("pod-env-reserved", "cel", f"{POD}.env[0].name", "set by the operator",
         {f"{POD}.env": [{"name": "HF_HOME", "value": "/root"}]}),
    Case("pod-env-reserved-prefix", "cel", f"{POD}.env[0].name", "set by the operator",
         {f"{POD}.env": [{"name": "VISIONR1_WORK_DIR", "value": "/x"}]}),
    Case("pod-env-bad-name", "schema", f"{POD}.env[0].name", "should match pattern",
         {f"{POD}.env": [{"name": "1 X", "value": "y"}]}),
    Case("pod-env-value-and-from", "cel", f"{POD}.env[0].valueFrom", "not both",
         {f"{POD}.env": [{"name": "X", "value": "y", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]}),
    Case("pod-env-from-two-sources", "cel", f"{POD}.env[0].valueFrom", "exactly one",
         {f"{POD}.env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"},
                                                     "secretKeyRef": {"name": "s", "key": "k"}}}]}),
    Case("pod-env-duplicate", "schema", f"{POD}.env[1]", "already used by env[0]",
         {f"{POD}.env": [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]}),
    Case("pod-volume-reserved", "cel", f"{POD}.volumes[0].name", "operator's volumes",
         {f"{POD}.volumes": [{"name": "scratch", "emptyDir": {}}]}),
    Case("pod-volume-reserved-pvc", "cel", f"{POD}.volumes[0].name", "operator's volumes",
         {f"{POD}.volumes": [{"name": "pvc-0", "emptyDir": {}}]}),
    Case("pod-volume-no-source", "cel", f"{POD}.volumes[0]", "exactly one of",
         {f"{POD}.volumes": [{"name": "empty"}]}),
    Case("pod-volume-two-sources", "cel", f"{POD}.volumes[0]", "exactly one of",
         {f"{POD}.volumes": [{"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}}]}),
    Case("pod-volume-duplicate", "schema", f"{POD}.volumes[1]", "already used by volumes[0]",
         {f"{POD}.volumes": [PVC_VOLUME, PVC_VOLUME]}),
    Case("pod-volume-free-form", "schema", f"{POD}.volumes[0].hostPath", "unknown field",
         {f"{POD}.volumes": [{"name": "host", "hostPath": {"path": "/"}}]}),
    Case("pod-mount-unknown-volume", "cel", f"{POD}.volumeMounts[0].name", "not in pod.volumes",
         {f"{POD}.volumeMounts": [MOUNT]}),
    Case("pod-mount-reserved-path", "cel", f"{POD}.volumeMounts[0].mountPath", "which the operator mounts",
         {f"{POD}.volumes": [PVC_VOLUME], f"{POD}.volumeMounts": [{"name": "datasets", "mountPath": "/scratch"}]}),
    Case("pod-mount-inside-reserved", "cel", f"{POD}.volumeMounts[0].mountPath", "which the operator mounts",
         {f"{POD}.volumes": [PVC_VOLUME],
          f"{POD}.volumeMounts": [{"name": "datasets", "mountPath": "/scratch/huggingface"}]}),
    Case("pod-mount-above-reserved", "cel", f"{POD}.volumeMounts[0].mountPath", "which the operator mounts",
         {f"{POD}.volumes": [PVC_VOLUME], f"{POD}.volumeMounts": [{"name": "datasets", "mountPath": "/etc"}]}),
    Case("pod-mount-dotdot", "cel", f"{POD}.volumeMounts[0].mountPath", "'..'",
         {f"{POD}.volumes": [PVC_VOLUME], f"{POD}.volumeMounts": [{"name": "datasets", "mountPath": "/data/../tmp"}]}),
    Case("pod-mount-relative", "schema", f"{POD}.volumeMounts[0].mountPath", "should match pattern",
         {f"{POD}.volumes": [PVC_VOLUME], f"{POD}.volumeMounts": [{"name": "datasets", "mountPath": "data"}]}),
    Case("pod-mount-duplicate-path", "schema", f"{POD}.volumeMounts[1]", "already used by volumeMounts[0]",
         {f"{POD}.volumes": [PVC_VOLUME], f"{POD}.volumeMounts": [MOUNT, MOUNT]}),
    Case("pod-scheduler-name", "schema", f"{POD}.schedulerName", "should match pattern",
         {f"{POD}.schedulerName": "My Scheduler"}),
    Case("pod-runtime-class", "schema", f"{POD}.runtimeClassName", "should match pattern",
         {f"{POD}.runtimeClassName": "NVIDIA"}),
    Case("pod-rdma-resource-name", "cel", f"{POD}.rdma.resources", "not an rdma/<name> resource",
         {f"{POD}.rdma": {"resources": {"nvidia.com/gpu": 1}}}),
    Case("pod-rdma-zero", "schema", f"{POD}.rdma.resources.rdma/hca", "greater than or equal to 1",
         {f"{POD}.rdma": {"resources": {"rdma/hca": 0}}}),
]



def _nest(changes: dict) -> dict:
    """``{"<POD>.labels": x}`` -> ``{"<POD>": {"labels": x}}``: the example has no pod yet."""
    return {POD: {k[len(POD) + 1:]: v for k, v in changes.items()}}


CASES = [dataclasses.replace(c, changes=_nest(c.changes)) for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_refuses_naming_the_field(case, tmp_path, capsys):
    manifest = tmp_path / f"{case.id}.yaml"
    manifest.write_text(case.text())
    assert main(["validate", str(manifest)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    prefix = f"{manifest}: {case.path}: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starts with {prefix!r} in:\n{err}"
    assert any(case.message in line for line in lines), f"{case.message!r} not in {lines}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_crd_refuses_it_too(case):
    doc = mutated(case.changes)
    schema_errors = structural_errors(doc)
    if case.where == "schema":
        assert any(_names(e, case.path) for e in schema_errors), schema_errors
    else:
        assert schema_errors == []
        assert any(_names(e, case.path) for e in cel_errors(doc)), cel_errors(doc)


# --- what validates reaches the pod ---------------------------------------------------------

FULL = {
    "labels": {"team": "vision", "example.com/cost-center": "r1"},
    "annotations": {"prometheus.io/scrape": "true", "kueue.x-k8s.io/podset-preferred-topology": "rack"},
    "env": [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "NCCL_IB_HCA", "valueFrom": {"configMapKeyRef": {"name": "fabric", "key": "hca"}}},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key", "optional": True}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ],
    "volumes": [
        PVC_VOLUME,
        {"name": "fabric", "configMap": {"name": "fabric", "items": [{"key": "topo.xml", "path": "topo.xml"}]}},
        {"name": "certs", "secret": {"secretName": "ca-bundle"}},
        {"name": "fast", "emptyDir": {"sizeLimit": "100Gi"}},
        {"name": "nfs", "nfs": {"server": "nfs.storage", "path": "/exports/models", "readOnly": True}},
        {"name": "lustre", "csi": {"driver": "lustre.csi.example.com", "volumeAttributes": {"fs": "a"}}},
    ],
    "volumeMounts": [
        MOUNT,
        {"name": "fabric", "mountPath": "/etc/nccl", "readOnly": True},
        {"name": "certs", "mountPath": "/etc/ssl/extra", "subPath": "ca.pem", "readOnly": True},
        {"name": "fast", "mountPath": "/fast"},
        {"name": "nfs", "mountPath": "/models"},
        {"name": "lustre", "mountPath": "/lustre"},
    ],
    "schedulerName": "volcano",
    "runtimeClassName": "nvidia",
    "rdma": {"resources": {"rdma/hca_shared_devices_a": 1}},
}


def with_pod(path, stage: str, pod: dict) -> VisionR1Run:
    doc = json.loads(json.dumps(load_run(path).model_dump(mode="json", by_alias=True, exclude_none=True)))
    doc["spec"]["stages"][stage]["pod"] = copy.deepcopy(pod)
    return VisionR1Run.model_validate(doc, **WIRE)


def render(run: VisionR1Run, stage: str, attempt: int = 1) -> dict:
    plan = next(p for p in build_plan(run) if p.name == stage)
    owner = naming.Owner(run.name, run.namespace, "uid-1")
    return jobs.build_job(owner, run.spec, plan, attempt, suspend=False)


def test_every_setting_reaches_the_pod_and_the_pod_is_valid():
    multinode = EXAMPLES[[p.name for p in EXAMPLES].index("multinode.yaml")]
    run = with_pod(multinode, "sft", FULL)
    job = render(run, "sft")
    kubernetes_validate.validate(job, "1.33", strict=True)
    template = job["spec"]["template"]
    pod, (container,) = template["spec"], template["spec"]["containers"]
    labels = template["metadata"]["labels"]
    assert labels["team"] == "vision" and labels["example.com/cost-center"] == "r1"
    assert labels[naming.LABEL_STAGE] == "sft"  # and the operator's are all there
    assert template["metadata"]["annotations"] == FULL["annotations"]
    env = {e["name"]: e for e in container["env"]}
    for var in FULL["env"]:
        assert env[var["name"]] == {**var, **({"valueFrom": {k: {"optional": False, **v} if k.endswith("KeyRef") else v
                                                          for k, v in var["valueFrom"].items()}}
                                              if "valueFrom" in var else {})}
    assert [e["name"] for e in container["env"]][-4:] == [e["name"] for e in FULL["env"]]  # after the operator's
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["datasets"] == PVC_VOLUME
    assert volumes["nfs"] == FULL["volumes"][4] and volumes["lustre"] == FULL["volumes"][5]
    assert volumes["fabric"]["configMap"] == FULL["volumes"][1]["configMap"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"] == MOUNT and mounts["/etc/ssl/extra"]["subPath"] == "ca.pem"
    assert mounts["/etc/nccl"]["readOnly"] is True
    assert pod["schedulerName"] == "volcano" and pod["runtimeClassName"] == "nvidia"
    # RDMA: IPC_LOCK added (every other capability still dropped), its resource requested.
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["resources"]["requests"]["rdma/hca_shared_devices_a"] == "1"
    assert container["resources"]["limits"]["rdma/hca_shared_devices_a"] == "1"
    # Another stage of the same run keeps the hardened pod.
    other = render(run, "ptst-1")["spec"]["template"]["spec"]
    assert other["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "schedulerName" not in other and "runtimeClassName" not in other


def test_pod_settings_leave_the_config_hash_alone():
    # Labels, env and mounts are placement, like nodeSelector: a finished stage stays finished.
    multinode = EXAMPLES[[p.name for p in EXAMPLES].index("multinode.yaml")]
    plain = render(load_run(multinode), "sft")["metadata"]["annotations"][naming.ANNOTATION_CONFIG_HASH]
    full = render(with_pod(multinode, "sft", FULL), "sft")["metadata"]["annotations"][naming.ANNOTATION_CONFIG_HASH]
    assert plain == full


# --- the operator's own names are the reserved ones -------------------------------------------


def _every_job():
    """The Jobs of every example's stages, and of every stage with the most options on."""
    for path in EXAMPLES:
        run = load_run(path)
        for plan in build_plan(run):
            owner = naming.Owner(run.name, run.namespace, "uid")
            yield path.name, jobs.build_job(owner, run.spec, plan, 2, suspend=False)


def test_what_the_operator_sets_is_reserved():
    seen_env: set[str] = set()
    for name, job in _every_job():
        template = job["spec"]["template"]
        for key in template["metadata"]["labels"]:
            assert key.startswith(ps.RESERVED_KEY_PREFIXES) or key in ps.RESERVED_LABELS, (name, key)
        (container,) = template["spec"]["containers"]
        for var in container["env"]:
            seen_env.add(var["name"])
            assert var["name"] in ps.RESERVED_ENV or var["name"].startswith(ps.RESERVED_ENV_PREFIX), (name, var)
        for volume in template["spec"]["volumes"]:
            assert volume["name"] in ps.RESERVED_VOLUMES or __import__("re").match(
                ps.RESERVED_VOLUME_PATTERN, volume["name"]), (name, volume["name"])
        for mount in container["volumeMounts"]:
            assert ps._path_problem(mount["mountPath"]) is not None, (name, mount["mountPath"])
    # The examples between them use the options that set these (S3, a token, several nodes).
    assert {"AWS_ACCESS_KEY_ID", "HF_TOKEN", "MASTER_ADDR", "NODE_RANK", "HF_HOME", "TMPDIR"} <= seen_env


def test_a_stage_without_pod_settings_renders_as_before():
    run = VisionR1Run.model_validate(BASE, **WIRE)
    for plan in build_plan(run):
        pod = jobs.build_job(naming.Owner(run.name, run.namespace, "u"), run.spec, plan, 1, suspend=False)
        template = pod["spec"]["template"]
        assert "annotations" not in template["metadata"]
        assert "schedulerName" not in template["spec"] and "runtimeClassName" not in template["spec"]


# --- the real API server ----------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_api_server_refuses_it_naming_the_field(case, crd_cluster):
    from test_cluster_crd import server_paths

    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(mutated(case.changes)),
                              check=False)
    assert out.returncode != 0, f"the API server accepted {case.id}"
    paths = server_paths(out.stderr)
    # server_paths reads [\w.\[\]] paths; an rdma/<name> map key has a "/" in it.
    assert case.path in paths or any(case.path.startswith((p + ".", p + "[")) for p in paths) or (
        f"{case.path}: " in out.stderr), out.stderr


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_the_api_server_accepts_every_setting_and_the_rendered_job(crd_cluster):
    doc = mutated({POD: FULL})
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode == 0, out.stderr
    run = VisionR1Run.model_validate(doc, **WIRE)
    job = render(run, "sft")
    job["metadata"].pop("ownerReferences")  # the run does not exist on this server
    job["metadata"]["namespace"] = "default"
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(job), check=False)
    assert out.returncode == 0, out.stderr


from test_cluster_crd import crd_cluster  # noqa: E402,F401  (the fixture, for the tests above)
