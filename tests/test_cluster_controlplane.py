"""The test control plane itself: what it reports, what it runs, how a test steers pods."""

from __future__ import annotations

import json
import time

import pytest
from cluster_harness import ensure_namespace, get_json, wait_until
from kwok_stages import exit_stage

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_version_components_and_logs(cluster):
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == "v1.35.4" and version["minor"] == "35"
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        assert (cluster.cluster_dir / "logs" / f"{name}.log").stat().st_size > 0, name
    assert cluster.kubeconfig.exists()


def test_fake_nodes_offer_gpus(cluster):
    nodes = get_json(cluster, "nodes")["items"]
    assert len(nodes) >= 4
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert not node["spec"].get("taints"), node["spec"]["taints"]


def test_rbac_is_enforced_for_a_service_account(cluster):
    ensure_namespace(cluster, "rbac-check")
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", "rbac-check")
    can = cluster.kubectl("auth", "can-i", "create", "jobs", "-n", "rbac-check",
                          "--as=system:serviceaccount:rbac-check:nobody", check=False)
    assert can.stdout.strip() == "no"


def _job(name: str, labels: dict[str, str], gpus: int = 1) -> str:
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "trainer:test",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}},
    })


def test_a_stage_object_makes_a_pod_fail_with_a_chosen_exit_code_after_a_chosen_time(cluster):
    """How tests play a trainer that fails: a kwok Stage of weight 1 selecting the pods."""
    labels = {"test": "exit-3"}
    cluster.kubectl_apply(exit_stage("exit-3-after-2s", labels, exit_code=3, after_seconds=2,
                                     message='{"step": 7}'))
    try:
        started = time.monotonic()
        cluster.kubectl("apply", "-f", "-", input=_job("exits-3", labels, gpus=8))
        job = wait_until(lambda: _finished(cluster, "exits-3"), 60, "the Job to fail")
        assert job["status"].get("failed") == 1
        pod = get_json(cluster, "pods", "-l", "test=exit-3")["items"][0]
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3 and terminated["message"] == '{"step": 7}'
        assert time.monotonic() - started >= 2
        # The real scheduler placed a pod asking for 8 GPUs on one fake node.
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
    finally:
        cluster.kubectl("delete", "stage", "exit-3-after-2s", check=False)
        cluster.kubectl("delete", "job", "exits-3", "--cascade=foreground", check=False)


def test_without_a_stage_a_jobs_pod_succeeds(cluster):
    cluster.kubectl("apply", "-f", "-", input=_job("just-works", {"test": "default"}))
    job = wait_until(lambda: _finished(cluster, "just-works"), 60, "the Job to finish")
    assert job["status"].get("succeeded") == 1
    cluster.kubectl("delete", "job", "just-works", check=False)


def test_gpus_are_a_real_scheduling_constraint(cluster):
    """A pod asking for more GPUs than any node has stays Pending, as on a real cluster."""
    cluster.kubectl("apply", "-f", "-", input=_job("too-big", {"test": "too-big"}, gpus=9))
    try:
        def unschedulable():
            pods = get_json(cluster, "pods", "-l", "test=too-big")["items"]
            conditions = pods[0]["status"].get("conditions", []) if pods else []
            return any(c["type"] == "PodScheduled" and c["reason"] == "Unschedulable" for c in conditions)

        wait_until(unschedulable, 60, "the scheduler to refuse the pod")
    finally:
        cluster.kubectl("delete", "job", "too-big", check=False)


def _finished(cluster, name: str):
    job = get_json(cluster, "job", name)
    done = {c["type"] for c in job["status"].get("conditions", []) if c["status"] == "True"}
    return job if done & {"Complete", "Failed"} else None
