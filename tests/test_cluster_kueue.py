"""Runs under a queueName with the real Kueue (issue 14, "Kueue, for real"; finding 2).

Kueue's manager, built from its pinned Go module (tests/cluster/kueue/), runs against the
real control plane with the ``batch/job`` integration and its webhooks; the tests give it
a ResourceFlavor, a ClusterQueue with 16 GPUs of quota (preemption of lower priorities
within the queue) and a LocalQueue. The operator runs with the chart's ServiceAccount
token, so its Kueue calls are judged by the real RBAC authorizer. kwok's fake nodes run
the pods; a Stage of weight 1 holds a stage's pods Running for as long as a test needs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cluster_harness import (
    RELEASE,
    ensure_namespace,
    get_json,
    helm,
    install_chart,
    installed_operator,
    operator_process,
    service_account_kubeconfig,
    wait_until,
)
from kwok_stages import exit_stage
from operator_harness import run_manifest
from watch import Watch

from visionr1_operator.cluster.naming import LABEL_RUN, LABEL_STAGE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "queued"
QUEUE = "gpu"
GPU_QUOTA = 16
HOLD = 600  # seconds a held stage's pods stay Running (the Stage is deleted long before)


def queue_objects() -> str:
    big = "1000000"
    return "\n---\n".join(json.dumps(o) for o in [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "gpu-nodes"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "gpu-cq"},
         "spec": {
             "namespaceSelector": {},
             "preemption": {"withinClusterQueue": "LowerPriority"},
             "resourceGroups": [{
                 "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
                 "flavors": [{"name": "gpu-nodes", "resources": [
                     {"name": "cpu", "nominalQuota": big},
                     {"name": "memory", "nominalQuota": f"{big}Gi"},
                     {"name": "ephemeral-storage", "nominalQuota": f"{big}Gi"},
                     {"name": "nvidia.com/gpu", "nominalQuota": GPU_QUOTA},
                 ]}],
             }],
         }},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": NAMESPACE}, "spec": {"clusterQueue": "gpu-cq"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
         "metadata": {"name": "urgent"}, "value": 1000, "description": "preempts research runs"},
    ])


def queued_run(name: str, *, nodes: int = 1, gpus: int = 8, eval_stage: bool = False) -> dict:
    """A short run under the queue: SFT (and eval), each pod asking ``gpus`` GPUs."""
    doc = run_manifest(name, NAMESPACE, queueName=QUEUE)
    spec = doc["spec"]
    spec["data"]["coldStart"] = {"source": "s3://vr1/cold-start"}
    spec["stages"]["bridge"] = {"enabled": False}
    spec["stages"]["grpo"] = {"enabled": False}
    spec["stages"].pop("ptst", None)
    spec["stages"]["sft"]["resources"] = {"nodes": nodes, "gpusPerNode": gpus}
    spec["stages"]["eval"] = {"enabled": eval_stage, "resources": {"gpusPerNode": gpus}}
    return doc


def blocker_job(name: str, gpus: int, priority: str | None = None) -> str:
    """A plain Job in the queue that holds ``gpus`` GPUs of quota while its pod runs."""
    labels = {"kueue.x-k8s.io/queue-name": QUEUE, "test/hold": name}
    if priority:
        labels["kueue.x-k8s.io/priority-class"] = priority
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"suspend": True, "backoffLimit": 0, "template": {
            "metadata": {"labels": {"test/hold": name}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "work", "image": "work",
                "resources": {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}},
            }]}}},
    })


def hold(cluster, name: str, labels: dict[str, str]) -> None:
    cluster.kubectl_apply(exit_stage(name, labels, exit_code=0, after_seconds=HOLD))


def release(cluster, name: str, pods: str | None = None) -> None:
    """Delete a hold Stage; kwok picks a pod's next Stage on the pod's next change, so the
    held pods (``pods``, a label selector) are touched to end them now."""
    cluster.kubectl("delete", "stage.kwok.x-k8s.io", name, "--ignore-not-found")
    if pods:
        cluster.kubectl("annotate", "pods", "-n", NAMESPACE, "-l", pods, f"test/released={time.time()}",
                        "--overwrite", check=False)


@pytest.fixture(scope="module")
def queued(kueue, tmp_path_factory):
    """Kueue's queue objects, the CRD, the chart's RBAC and the operator with its token."""
    cluster = kueue
    ensure_namespace(cluster, NAMESPACE)
    cluster.kubectl_apply(queue_objects())
    install_chart(cluster, {})  # the CRD comes with the chart
    cluster.wait_established("visionr1runs.visionr1.io")
    cluster.wait_for_resource("vr1")
    sa, chart_args = installed_operator(cluster)
    tmp = tmp_path_factory.mktemp("kueue-operator")
    kubeconfig = service_account_kubeconfig(cluster, sa, tmp / "operator.kubeconfig")
    log = tmp / "operator.log"
    try:
        with operator_process(kubeconfig, chart_args, log) as operator:
            yield cluster, operator, log
    finally:
        cluster.kubectl("delete", "vr1", "--all", "-n", NAMESPACE, "--timeout=120s", check=False, timeout=150)
        helm(cluster).uninstall(RELEASE, timeout=120)


@pytest.fixture(autouse=True)
def _clean_queue(request):
    """After each test, whatever it left holds no quota: its runs, Jobs and hold Stages go."""
    yield
    if "queued" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("queued")[0]
    cluster.kubectl("delete", "vr1", "--all", "-n", NAMESPACE, "--timeout=120s", check=False, timeout=150)
    cluster.kubectl("delete", "jobs", "-n", NAMESPACE, "-l", "test/hold", "--cascade=foreground",
                    "--timeout=60s", check=False, timeout=90)
    stages = cluster.kubectl("get", "stage.kwok.x-k8s.io", "-o", "name", check=False).stdout.split()
    for stage in [s for s in stages if s.split("/")[-1].startswith("hold-")]:
        cluster.kubectl("delete", stage, check=False)


def run_status(cluster, name: str) -> dict:
    return get_json(cluster, "vr1", name, "-n", NAMESPACE).get("status") or {}


def stage_record(cluster, run: str, stage: str) -> dict:
    return next((r for r in run_status(cluster, run).get("stages") or [] if r["name"] == stage), {})


def job(cluster, name: str) -> dict | None:
    out = cluster.kubectl("get", "job", name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def workload_of(cluster, job_uid: str) -> dict | None:
    items = get_json(cluster, "workloads.kueue.x-k8s.io", "-n", NAMESPACE,
                     "-l", f"kueue.x-k8s.io/job-uid={job_uid}")["items"]
    return items[0] if items else None


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def pods_of(cluster, job_name: str) -> list[dict]:
    return get_json(cluster, "pods", "-n", NAMESPACE, "-l", f"batch.kubernetes.io/job-name={job_name}")["items"]


def suspend_flips(events, name: str) -> list[bool]:
    """The Job's spec.suspend values as the API server's watch showed them, repeats dropped."""
    values: list[bool] = []
    for event in events:
        if event.name == name and event.type != "DELETED":
            value = bool((event.obj.get("spec") or {}).get("suspend"))
            if not values or values[-1] != value:
                values.append(value)
    return values


def wait_phase(cluster, run: str, phase: str, timeout: float) -> None:
    try:
        wait_until(lambda: run_status(cluster, run).get("phase") == phase, timeout, f"run {run} {phase}")
    except AssertionError as exc:
        jobs = get_json(cluster, "jobs", "-n", NAMESPACE, "-l", f"{LABEL_RUN}={run}")["items"]
        pods = get_json(cluster, "pods", "-n", NAMESPACE, "-l", f"{LABEL_RUN}={run}")["items"]
        raise AssertionError(f"{exc}: status {json.dumps(run_status(cluster, run))[:3000]}; jobs "
                             f"{[(j['metadata']['name'], j['spec'].get('suspend'), j.get('status')) for j in jobs]}; "
                             f"pods {[(p['metadata']['name'], p['status'].get('phase')) for p in pods]}") from None


def delete_run(cluster, name: str) -> None:
    cluster.kubectl("delete", "vr1", name, "-n", NAMESPACE, "--timeout=120s", check=False, timeout=150)


def test_a_run_waits_for_quota_then_is_admitted_and_runs(queued):
    cluster, _, log = queued
    hold(cluster, "hold-quota-hog", {"test/hold": "quota-hog"})  # before its pod exists
    cluster.kubectl("create", "-f", "-", input=blocker_job("quota-hog", GPU_QUOTA))
    try:
        wait_until(lambda: (job(cluster, "quota-hog") or {}).get("spec", {}).get("suspend") is False, 60,
                   "Kueue to admit the quota hog")
        cluster.kubectl("create", "-f", "-", input=json.dumps(queued_run("waits", eval_stage=True)))
        sft = wait_until(lambda: job(cluster, "waits-sft-1"), 60, "the SFT Job")
        assert sft["spec"]["suspend"] is True and sft["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
        wait_until(lambda: workload_of(cluster, sft["metadata"]["uid"]), 60, "Kueue's Workload")
        wait_until(lambda: condition(workload_of(cluster, sft["metadata"]["uid"]), "QuotaReserved").get("reason")
                   == "Pending", 60, "the Workload to wait for quota")
        time.sleep(3)
        status = run_status(cluster, "waits")
        ready = condition({"status": status}, "Ready")
        assert status["phase"] == "Pending" and ready.get("reason") == "Queued", status
        assert job(cluster, "waits-sft-1")["spec"]["suspend"] is True and not pods_of(cluster, "waits-sft-1")
    finally:
        cluster.kubectl("delete", "job", "quota-hog", "-n", NAMESPACE, "--cascade=foreground", "--timeout=60s",
                        check=False)
        release(cluster, "hold-quota-hog")
    # The quota is free: Kueue admits SFT, then eval's Job, each in its turn.
    wait_phase(cluster, "waits", "Succeeded", 180)
    status = run_status(cluster, "waits")
    assert [(r["name"], r["state"], r["attempts"], r.get("failures", 0)) for r in status["stages"]] == [
        ("sft", "Succeeded", 1, 0), ("eval", "Succeeded", 1, 0)]
    assert condition(workload_of(cluster, job(cluster, "waits-eval-1")["metadata"]["uid"]), "Admitted")["status"] == "True"
    assert "Forbidden" not in log.read_text(errors="replace")
    delete_run(cluster, "waits")


def test_a_higher_priority_workload_preempts_the_stage_which_continues_uncounted(queued):
    cluster, _, log = queued
    hold(cluster, "hold-low-sft", {LABEL_RUN: "low", LABEL_STAGE: "sft"})
    with Watch(cluster, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs") as jobs:
        cluster.kubectl("create", "-f", "-", input=json.dumps(queued_run("low", gpus=8, nodes=2)))
        wait_until(lambda: run_status(cluster, "low").get("phase") == "Running"
                   and len([p for p in pods_of(cluster, "low-sft-1") if p["status"].get("phase") == "Running"]) == 2,
                   90, "the low-priority run to run")
        uid = job(cluster, "low-sft-1")["metadata"]["uid"]
        # An urgent Job wants 8 of the 16 GPUs the run holds: Kueue preempts the run's Workload.
        hold(cluster, "hold-urgent", {"test/hold": "urgent"})
        cluster.kubectl("create", "-f", "-", input=blocker_job("urgent", 8, priority="urgent"))
        wait_until(lambda: (job(cluster, "urgent") or {}).get("spec", {}).get("suspend") is False, 90,
                   "the urgent Job to be admitted")
        low = job(cluster, "low-sft-1")
        assert low["spec"]["suspend"] is True
        evicted = condition(workload_of(cluster, uid), "Evicted")
        assert evicted.get("status") == "True" and evicted.get("reason") == "Preempted", evicted
        wait_phase(cluster, "low", "Pending", 60)
        record = stage_record(cluster, "low", "sft")
        assert (record["state"], record["attempts"], record.get("failures", 0)) == ("Pending", 1, 0), record
        assert condition({"status": run_status(cluster, "low")}, "Failed").get("status") == "False"
        # The urgent work is done: Kueue admits the run's Workload again; the same Job (the
        # same attempt, so the trainer resumes from the checkpoint under its output) goes on.
        cluster.kubectl("delete", "job", "urgent", "-n", NAMESPACE, "--cascade=foreground", "--timeout=60s")
        release(cluster, "hold-urgent")
        wait_until(lambda: (job(cluster, "low-sft-1") or {}).get("spec", {}).get("suspend") is False, 90,
                   "Kueue to admit the run again")
        release(cluster, "hold-low-sft", f"{LABEL_RUN}=low")
        wait_phase(cluster, "low", "Succeeded", 120)
        events = jobs.snapshot()
    record = stage_record(cluster, "low", "sft")
    assert (record["attempts"], record.get("failures", 0)) == (1, 0), record
    assert {e.uid for e in events if e.name == "low-sft-1"} == {uid}  # never a second Job
    assert suspend_flips(events, "low-sft-1") == [True, False, True, False]  # created, admitted, preempted, re-admitted
    assert "Forbidden" not in log.read_text(errors="replace")
    delete_run(cluster, "low")


def test_suspending_a_queued_run_goes_through_kueue_without_flapping(queued):
    """Finding 2: the operator used to patch the admitted Job to suspend: true, and Kueue's job
    reconciler, whose Workload was still admitted, unsuspended it again: every round killed
    every pod. Now the Workload is deactivated and Kueue suspends the Job, once."""
    cluster, _, log = queued
    hold(cluster, "hold-pause-sft", {LABEL_RUN: "pause", LABEL_STAGE: "sft"})
    try:
        with Watch(cluster, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs") as jobs:
            cluster.kubectl("create", "-f", "-", input=json.dumps(queued_run("pause", gpus=4)))
            wait_until(lambda: run_status(cluster, "pause").get("phase") == "Running"
                       and any(p["status"].get("phase") == "Running" for p in pods_of(cluster, "pause-sft-1")),
                       90, "the run to run")
            uid = job(cluster, "pause-sft-1")["metadata"]["uid"]
            cluster.kubectl("patch", "vr1", "pause", "-n", NAMESPACE, "--type=merge", "-p",
                            json.dumps({"spec": {"suspend": True}}))
            wait_phase(cluster, "pause", "Suspended", 60)
            wait_until(lambda: not pods_of(cluster, "pause-sft-1"), 60, "the pods gone")
            time.sleep(15)  # long enough for several rounds of a fight
            flips_suspended = suspend_flips(jobs.snapshot(), "pause-sft-1")
            # created suspended, admitted, suspended by Kueue for the user: and no more flips.
            assert flips_suspended == [True, False, True], flips_suspended
            workload = workload_of(cluster, uid)
            assert workload["spec"]["active"] is False
            assert job(cluster, "pause-sft-1")["spec"]["suspend"] is True
            cluster.kubectl("patch", "vr1", "pause", "-n", NAMESPACE, "--type=merge", "-p",
                            json.dumps({"spec": {"suspend": False}}))
            wait_until(lambda: (job(cluster, "pause-sft-1") or {}).get("spec", {}).get("suspend") is False, 90,
                       "Kueue to admit the resumed run")
            wait_phase(cluster, "pause", "Running", 60)
            time.sleep(5)
            events = jobs.snapshot()
    finally:
        release(cluster, "hold-pause-sft", f"{LABEL_RUN}=pause")
    # ... then admitted again after the resume: nothing more.
    assert suspend_flips(events, "pause-sft-1") == [True, False, True, False]
    assert workload_of(cluster, uid)["spec"]["active"] is True
    record = stage_record(cluster, "pause", "sft")
    assert (record["attempts"], record.get("failures", 0)) == (1, 0), record
    assert {e.uid for e in events if e.name == "pause-sft-1"} == {uid}
    assert "Forbidden" not in log.read_text(errors="replace")
    wait_phase(cluster, "pause", "Succeeded", 120)
    delete_run(cluster, "pause")


def test_a_multi_node_stage_is_admitted_all_or_nothing(queued):
    cluster, _, _ = queued
    hold(cluster, "hold-half", {"test/hold": "half"})
    cluster.kubectl("create", "-f", "-", input=blocker_job("half", GPU_QUOTA // 2))
    try:
        wait_until(lambda: (job(cluster, "half") or {}).get("spec", {}).get("suspend") is False, 60,
                   "the half-quota Job to be admitted")
        # 2 pods x 8 GPUs = 16 > the 8 left: one pod's worth fits, the stage must not start at all.
        cluster.kubectl("create", "-f", "-", input=json.dumps(queued_run("wide", nodes=2, gpus=8)))
        sft = wait_until(lambda: job(cluster, "wide-sft-1"), 60, "the SFT Job")
        assert sft["spec"]["parallelism"] == 2 and sft["spec"]["completionMode"] == "Indexed"
        workload = wait_until(lambda: workload_of(cluster, sft["metadata"]["uid"]), 60, "Kueue's Workload")
        assert [p["count"] for p in workload["spec"]["podSets"]] == [2]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert not pods_of(cluster, "wide-sft-1"), (
                "a pod of a half-admitted stage", workload_of(cluster, sft["metadata"]["uid"]).get("status"),
                (job(cluster, "half") or {}).get("status"), [(p["metadata"]["name"], p["status"].get("phase"))
                                                             for p in pods_of(cluster, "half")])
            time.sleep(1)
        assert condition(workload_of(cluster, sft["metadata"]["uid"]), "QuotaReserved").get("status") == "False"
    finally:
        hold(cluster, "hold-wide-sft", {LABEL_RUN: "wide", LABEL_STAGE: "sft"})
        cluster.kubectl("delete", "job", "half", "-n", NAMESPACE, "--cascade=foreground", "--timeout=60s",
                        check=False)
        release(cluster, "hold-half")
    try:
        wait_until(lambda: len([p for p in pods_of(cluster, "wide-sft-1") if p["status"].get("phase") == "Running"])
                   == 2, 90, "both pods to run")
        admission = workload_of(cluster, sft["metadata"]["uid"])["status"]["admission"]
        assert admission["podSetAssignments"][0]["count"] == 2
        assert admission["podSetAssignments"][0]["resourceUsage"]["nvidia.com/gpu"] == "16"
    finally:
        release(cluster, "hold-wide-sft", f"{LABEL_RUN}=wide")
    wait_phase(cluster, "wide", "Succeeded", 120)
    delete_run(cluster, "wide")
