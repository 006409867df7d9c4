"""Run lifecycle on the real control plane, as kubectl and kstatus read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_harness import ensure_namespace, get_json, operator_process
from operator_harness import run_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def test_kubectl_wait_returns_for_a_finished_run_whose_spec_was_edited(cluster, tmp_path):
    """kubectl wait (and Flux's kstatus) wait until a condition's observedGeneration reaches
    metadata.generation: a finished run must keep it current when its spec is edited."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.wait_established("visionr1runs.visionr1.io")
    cluster.wait_for_resource("vr1")
    namespace = "lifecycle"
    ensure_namespace(cluster, namespace)
    log = tmp_path / "operator.log"
    with operator_process(cluster.kubeconfig, ["--standalone"], log):
        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest("edited", namespace)))
        cluster.kubectl("wait", "--for=condition=Succeeded", "vr1/edited", "-n", namespace,
                        "--timeout=240s", timeout=260)
        cluster.kubectl("patch", "vr1", "edited", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"suspend": True}}))
        generation = get_json(cluster, "vr1", "edited", "-n", namespace)["metadata"]["generation"]
        waited = cluster.kubectl("wait", "--for=condition=Succeeded", "vr1/edited", "-n", namespace,
                                 "--timeout=30s", check=False, timeout=60)
        status = get_json(cluster, "vr1", "edited", "-n", namespace)["status"]
        assert waited.returncode == 0, (waited.stderr, status.get("observedGeneration"), generation)
        assert status["observedGeneration"] == generation and status["phase"] == "Succeeded"
        assert all(c["observedGeneration"] == generation for c in status["conditions"])
        cluster.kubectl("delete", "vr1", "edited", "-n", namespace, "--timeout=60s", check=False)
