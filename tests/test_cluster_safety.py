"""A hostile tenant against the operator on the real control plane (issue: multi-tenant safety)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cluster_harness import ensure_namespace, get_json, operator_process, wait_until
from operator_harness import run_manifest

from visionr1_operator.cluster.naming import LABEL_RUN

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def nested(depth: int) -> dict:
    """``{"x": {"x": ... {}}}``, ``depth`` levels deep (built without recursion)."""
    inner: dict = {}
    for _ in range(depth):
        inner = {"x": inner}
    return inner


def _dumps(doc: dict) -> str:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # json.dumps recurses once per level
    try:
        return json.dumps(doc)
    finally:
        sys.setrecursionlimit(limit)


@pytest.fixture
def crd_installed(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.wait_established("visionr1runs.visionr1.io")
    cluster.wait_for_resource("vr1")
    return cluster


def test_a_deeply_nested_affinity_cannot_stop_the_operator_for_other_tenants(crd_installed, tmp_path):
    cluster = crd_installed
    ensure_namespace(cluster, "tenant-a")
    ensure_namespace(cluster, "tenant-b")
    log = tmp_path / "operator.log"
    with operator_process(cluster.kubeconfig, ["--standalone"], log) as operator:
        hostile = run_manifest("hostile", "tenant-a")
        hostile["spec"]["stages"]["sft"]["resources"] = {"affinity": {"nodeAffinity": nested(1500)}}
        refused = cluster.kubectl("create", "-f", "-", input=_dumps(hostile), check=False)

        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest("innocent", "tenant-b")))
        # The other tenant's run gets its first Job: the operator's watch is alive.
        wait_until(lambda: get_json(cluster, "jobs", "-n", "tenant-b", "-l", f"{LABEL_RUN}=innocent")["items"],
                   90, "tenant-b's first Job")
        assert operator.poll() is None
        assert "RecursionError" not in log.read_text(errors="replace")
        # The API server itself refuses the hostile object: affinity has a typed, bounded schema.
        assert refused.returncode != 0, "the API server stored a 1,500-level affinity"
        assert "spec.stages.sft.resources.affinity" in refused.stderr, refused.stderr
        # Cleaned up while the operator runs: it removes its finalizer from each run.
        for namespace in ("tenant-a", "tenant-b"):
            cluster.kubectl("delete", "vr1", "--all", "-n", namespace, "--timeout=60s", check=False)


def test_the_admins_policy_refuses_a_run_before_any_pod_exists(crd_installed, tmp_path):
    """With --allow-image-prefix and --allow-priority-class, a run asking for another image
    or a critical priority class gets InvalidSpec naming the field, and no Job."""
    cluster = crd_installed
    ensure_namespace(cluster, "tenant-c")
    log = tmp_path / "operator.log"
    flags = ["--standalone", "--allow-image-prefix=registry.example.com/", "--allow-priority-class=research-low"]
    with operator_process(cluster.kubeconfig, flags, log):
        greedy = run_manifest("greedy", "tenant-c")
        greedy["spec"]["stages"]["sft"]["resources"] = {"priorityClassName": "system-cluster-critical"}
        miner = run_manifest("miner", "tenant-c", image="docker.io/evil/miner:latest")
        fine = run_manifest("fine", "tenant-c")
        for doc in (greedy, miner, fine):
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))

        def invalid(name: str):
            status = get_json(cluster, "vr1", name, "-n", "tenant-c").get("status") or {}
            return next((c for c in status.get("conditions", [])
                         if c["type"] == "InvalidSpec" and c["status"] == "True"), None)

        greedy_condition = wait_until(lambda: invalid("greedy"), 60, "InvalidSpec on greedy")
        assert "spec.stages.sft.resources.priorityClassName" in greedy_condition["message"]
        miner_condition = wait_until(lambda: invalid("miner"), 60, "InvalidSpec on miner")
        assert "docker.io/evil/miner:latest" in miner_condition["message"]
        wait_until(lambda: get_json(cluster, "jobs", "-n", "tenant-c", "-l", f"{LABEL_RUN}=fine")["items"],
                   60, "the allowed run's first Job")
        for name in ("greedy", "miner"):
            assert get_json(cluster, "jobs", "-n", "tenant-c", "-l", f"{LABEL_RUN}={name}")["items"] == []
        cluster.kubectl("delete", "vr1", "--all", "-n", "tenant-c", "--timeout=60s", check=False)


PLANTED = {
    ("hf-token", "token"): "planted-hf-token-5b1c9e",
    ("s3-credentials", "AWS_ACCESS_KEY_ID"): "planted-access-key-77aa01",
    ("s3-credentials", "AWS_SECRET_ACCESS_KEY"): "planted-secret-key-88bb02",
    ("openai", "key"): "planted-openai-key-99cc03",
}


def test_no_secret_value_reaches_any_object_status_event_or_log(crd_installed, tmp_path):
    """Distinct values in every Secret a run names; after the run has gone through every
    stage, none appears in anything in the namespace but the Secrets themselves, nor in the
    operator's log. (The stage pods would get them by secretKeyRef; kwok runs no trainer,
    whose own outputs test_safety_secrets.py searches.)"""
    cluster = crd_installed
    namespace = "tenant-secrets"
    ensure_namespace(cluster, namespace)
    secrets: dict[str, dict[str, str]] = {}
    for (name, key), value in PLANTED.items():
        secrets.setdefault(name, {})[key] = value
    for name, data in secrets.items():
        cluster.kubectl("create", "secret", "generic", name, "-n", namespace,
                        *[f"--from-literal={k}={v}" for k, v in data.items()])
    log = tmp_path / "operator.log"
    with operator_process(cluster.kubeconfig, ["--standalone"], log):
        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest("secretive", namespace)))
        cluster.kubectl("wait", "--for=condition=Succeeded", "vr1/secretive", "-n", namespace,
                        "--timeout=240s", timeout=260)
        everything = cluster.kubectl("get", "configmaps,services,jobs,pods,events,visionr1runs",
                                     "-n", namespace, "-o", "json").stdout
        cluster.kubectl("delete", "vr1", "secretive", "-n", namespace, "--timeout=60s", check=False)
    assert '"kind": "Job"' in everything and '"kind": "Event"' in everything
    found = [v for v in PLANTED.values() if v in everything or v in log.read_text(errors="replace")]
    assert found == []
