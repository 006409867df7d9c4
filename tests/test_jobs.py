"""Pure builders and readers of a stage attempt's Kubernetes objects (no cluster)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest

from visionr1_operator.cluster import jobs, naming, observe
from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifest import load_run, validate_document
from visionr1_operator.plan import build_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OWNER_UID = "0b1c5c2e-7d0b-4a43-9d9b-5a4f0f6f7e21"


def owner_of(run: VisionR1Run) -> naming.Owner:
    return naming.Owner(run.name, run.namespace, OWNER_UID)


def plans_of(run: VisionR1Run) -> dict:
    return {p.name: p for p in build_plan(run, "visionr1/trainer:test")}


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, "1.33", strict=True)


@pytest.fixture(scope="module")
def multinode() -> VisionR1Run:
    return load_run(EXAMPLES / "multinode.yaml")


@pytest.fixture(scope="module")
def paper() -> VisionR1Run:
    return load_run(EXAMPLES / "vision-r1-7b.yaml")


def test_single_node_stage(paper):
    run, plan = paper, plans_of(paper)["ptst-1"]
    objects = jobs.build_stage_objects(owner_of(run), run.spec, plan, 2, suspend=False)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]  # no Service for one node
    config_map, job = objects
    for obj in objects:
        validate(obj)
        meta = obj["metadata"]
        assert meta["name"] == "vision-r1-7b-ptst-1-2" and meta["namespace"] == "research"
        assert meta["labels"] == {
            "app.kubernetes.io/managed-by": "visionr1-operator", "visionr1.io/run": "vision-r1-7b",
            "visionr1.io/stage": "ptst-1", "visionr1.io/attempt": "2",
        }
        (ref,) = meta["ownerReferences"]
        assert ref == {"apiVersion": "visionr1.io/v1alpha1", "kind": "VisionR1Run", "name": "vision-r1-7b",
                       "uid": OWNER_UID, "controller": True, "blockOwnerDeletion": True}
    # The ConfigMap holds the attempt's config, exactly what the trainer validates.
    config = json.loads(config_map["data"]["stage.json"])
    assert config == plan.for_attempt(2).config_json() and config["attempt"] == 2
    assert config_map["immutable"] is True

    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["completions"] == spec["parallelism"] == 1
    assert "completionMode" not in spec and spec["suspend"] is False
    assert spec["podReplacementPolicy"] == "Failed"
    bad_config, disruption = spec["podFailurePolicy"]["rules"]
    assert bad_config == {"action": "FailJob",
                          "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
    assert disruption["action"] == "Ignore"  # one pod: the Job controller replaces it
    assert disruption["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == plan.image
    # 8 GPUs on one node: data-parallel GRPO under torchrun, one process per GPU.
    assert container["command"] == [
        "python", "-m", "visionr1_trainer.launch", "grpo", "--config", "/etc/visionr1/stage.json", "--",
        "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=8",
        "-m", "visionr1_trainer", "grpo", "--config", "/etc/visionr1/stage.json",
    ]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "vision-r1-7b-ptst-1-2"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": plan.resources.shared_memory}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/etc/visionr1"] == "config"


def test_secrets_are_referenced_never_copied(paper):
    run = paper
    plans = plans_of(run)
    job = jobs.build_job(owner_of(run), run.spec, plans["bridge"], 1, suspend=False)
    env = env_of(job)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": key}}}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_REGION"] == {"name": "AWS_REGION", "value": "us-east-1"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    # The bridge's reasoning model is behind an API: its key, by name, under a clear variable.
    assert env["VISIONR1_BRIDGE_REASONING_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "deepseek-api", "key": "api-key"}
    assert "VISIONR1_BRIDGE_MULTIMODAL_API_KEY" not in env  # vLLM, no key
    judge = env_of(jobs.build_job(owner_of(run), run.spec, plans["eval"], 1, suspend=False))
    assert judge["VISIONR1_JUDGE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "openai-judge"
    # Every env var with a value is a plain setting, no credentials among them.
    values = {e["name"]: e["value"] for e in env.values() if "value" in e}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & set(values)
    # Bridge generates with vLLM (its own tensor parallelism): one process, no torchrun.
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["python", "-m", "visionr1_trainer"]


def test_multi_node_stage(multinode):
    run, plan = multinode, plans_of(multinode)["sft"]
    assert plan.resources.nodes == 4
    config_map, service, job = jobs.build_stage_objects(owner_of(run), run.spec, plan, 1, suspend=True)
    for obj in (config_map, service, job):
        validate(obj)
    name = "vision-r1-7b-multinode-sft-1"
    assert service["metadata"]["name"] == name and service["kind"] == "Service"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    # Kueue: the queue label, and created suspended for Kueue to admit.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-research" and spec["suspend"] is True
    assert spec["activeDeadlineSeconds"] == 172800
    # Several nodes: a lost pod fails the attempt (rule 1), the operator restarts the group.
    assert spec["podFailurePolicy"]["rules"][1]["action"] == "FailJob"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pod["priorityClassName"] == "research-high"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["serviceAccountName"] == "visionr1-trainer"
    (container,) = pod["containers"]
    # /scratch of a 7B SFT on 4 nodes: the download (14 GB) and a saved model (14 GB), a quarter
    # of the 84 GB of fp32 master weights and Adam moments, 20Gi of JIT caches.
    assert container["resources"] == {
        "requests": {"cpu": "96", "memory": "1500Gi", "nvidia.com/gpu": "8", "ephemeral-storage": "66Gi"},
        "limits": {"cpu": "96", "memory": "1500Gi", "nvidia.com/gpu": "8"},
    }
    assert {v["name"]: v for v in pod["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "66Gi"}
    env = env_of(job)
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}"  # pod 0 through the headless Service
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["NNODES"]["value"] == "4" and env["NPROC_PER_NODE"]["value"] == "8"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage.svc.cluster.local:9000"
    assert container["command"][:7] == ["python", "-m", "visionr1_trainer.launch", "sft", "--config",
                                        "/etc/visionr1/stage.json", "--"]
    assert container["command"][7:13] == [
        "torchrun", "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)", "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
    ]
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]


def test_every_example_stage_validates():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        run = load_run(path)
        for plan in build_plan(run):
            for obj in jobs.build_stage_objects(owner_of(run), run.spec, plan, 1, suspend=False):
                validate(obj)


def test_pvc_storage_is_mounted(paper):
    doc = json.loads(paper.model_dump_json(by_alias=True, exclude_none=True))
    doc["spec"]["storage"] = {"uri": "pvc://vr1-artifacts/runs"}
    doc["spec"]["data"]["rl"]["source"] = "pvc://datasets/rl"
    run = validate_document(doc)
    job = jobs.build_job(owner_of(run), run.spec, plans_of(run)["ptst-2"], 1, suspend=False)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"vr1-artifacts", "datasets"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claims["vr1-artifacts"]] == "/mnt/visionr1/pvc/vr1-artifacts"
    env = env_of(job)
    assert env["VISIONR1_PVC_ROOT"]["value"] == "/mnt/visionr1/pvc"
    assert not any(name.startswith("AWS_") for name in env)


def test_config_hash_ignores_the_attempt_but_not_the_settings(paper):
    plan = plans_of(paper)["sft"]
    assert jobs.config_hash(plan) == jobs.config_hash(plan.for_attempt(7))
    doc = json.loads(paper.model_dump_json(by_alias=True, exclude_none=True))
    doc["spec"]["stages"]["sft"]["learningRate"] = 1e-5
    changed = plans_of(validate_document(doc))["sft"]
    assert jobs.config_hash(changed) != jobs.config_hash(plan)
    doc["spec"]["stages"]["sft"]["learningRate"] = plan.config.sft.learning_rate
    doc["spec"]["stages"]["sft"]["resources"]["nodeSelector"] = {"pool": "b"}  # placement only
    assert jobs.config_hash(plans_of(validate_document(doc))["sft"]) == jobs.config_hash(plan)


def test_a_run_name_starting_with_a_digit_gets_a_valid_service_name(multinode):
    doc = json.loads(multinode.model_dump_json(by_alias=True, exclude_none=True))
    doc["metadata"]["name"] = "7b-multinode"
    run = validate_document(doc)
    service = jobs.build_service(owner_of(run), plans_of(run)["sft"], 1)
    validate(service)
    assert service["metadata"]["name"] == "vr1-7b-multinode-sft-1"


# --- reading back -----------------------------------------------------------------------

JOB = {
    "metadata": {
        "name": "r-sft-2",
        "labels": {"visionr1.io/stage": "sft", "visionr1.io/attempt": "2"},
        "ownerReferences": [{"kind": "VisionR1Run", "uid": "u1"}],
    },
    "spec": {"suspend": False},
}


def job_with(status: dict | None = None, suspend: bool = False) -> dict:
    job = copy.deepcopy(JOB)
    job["spec"]["suspend"] = suspend
    if status is not None:
        job["status"] = status
    return job


def failed(reason: str, message: str) -> dict:
    return {"conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": "2026-01-01T00:00:09Z"}]}


def test_observe_job_states():
    assert observe.observe_job(job_with()).state == "Pending"
    assert observe.observe_job(job_with(suspend=True)).state == "Suspended"
    running = observe.observe_job(job_with({"startTime": "2026-01-01T00:00:00Z", "active": 1}))
    assert (running.state, running.stage, running.attempt, running.owner_uid) == ("Running", "sft", 2, "u1")
    done = observe.observe_job(job_with({"completionTime": "2026-01-01T00:00:05Z", "conditions": [
        {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}))
    assert (done.state, done.finished_at) == ("Succeeded", "2026-01-01T00:00:05Z")
    error = observe.observe_job(job_with(failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")))
    assert (error.state, error.failure_kind, error.finished_at) == ("Failed", "error", "2026-01-01T00:00:09Z")
    bad = observe.observe_job(job_with(failed(
        "PodFailurePolicy", "Container trainer for pod ns/r-sft-2-0-x failed with exit code 2 matching FailJob rule at index 0")))
    assert bad.failure_kind == "bad-config"
    lost = observe.observe_job(job_with(failed(
        "PodFailurePolicy", "Pod ns/r-sft-2-1-y has condition DisruptionTarget matching FailJob rule at index 1")))
    assert lost.failure_kind == "disruption"
    # A Job the Kueue preempted is suspended, not failed.
    assert observe.observe_job(job_with({"conditions": [{"type": "Suspended", "status": "True"}]}, suspend=True)).state == "Suspended"


def pod(index: int, exit_code: int | None, message: str = "", phase: str = "Succeeded", reason: str = "Error") -> dict:
    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {
            "terminated": {"exitCode": exit_code, "reason": reason, "message": message}}}]
    return {"metadata": {"name": f"r-sft-2-{index}", "labels": {"batch.kubernetes.io/job-name": "r-sft-2"},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"containers": [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9400}]}]},
            "status": status}


def test_pod_report_reads_the_trainers_summary_and_failures():
    summary = {"step": 100, "reward": 0.71, "artifactUri": "s3://b/r/sft/model"}
    report = observe.pod_report([pod(1, 0, ""), pod(0, 0, json.dumps(summary))])
    assert report == observe.PodReport(summary=summary, failure=None)
    report = observe.pod_report([pod(0, 1, json.dumps({"stage": "sft", "error": "RuntimeError: CUDA error"}))])
    assert report.failure == "pod r-sft-2-0 exited with code 1: RuntimeError: CUDA error"
    assert report.summary == {"stage": "sft", "error": "RuntimeError: CUDA error"}
    oom = observe.pod_report([pod(0, 137, "", reason="OOMKilled")])
    assert oom == observe.PodReport(summary=None, failure="pod r-sft-2-0 exited with code 137 (OOMKilled)")
    assert observe.pod_report([pod(0, None, phase="Running")]) == observe.PodReport()
    assert observe.pod_report([pod(0, 0, "not json")]).summary is None


def test_metrics_endpoint_is_the_running_rank_zero_pod():
    running = pod(0, None, phase="Running")
    running["status"]["podIP"] = "10.1.2.3"
    other = pod(1, None, phase="Running")
    other["status"]["podIP"] = "10.1.2.4"
    assert observe.metrics_endpoint([other, running]) == "http://10.1.2.3:9400/metrics"
    assert observe.metrics_endpoint([pod(0, None, phase="Pending")]) is None
    assert observe.pods_of([running, {"metadata": {"labels": {}}}], "r-sft-2") == [running]
