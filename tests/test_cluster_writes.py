"""Status writes per stage transition on the real control plane (the scale bench's goal:
at most 4 writes per transition: the status patch, the ConfigMap, the Job, and the patch
that records the new stage's pods running)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cluster_harness import ensure_namespace, operator_process
from kwok_stages import exit_stage
from operator_harness import run_manifest
from watch import Watch

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "writes"
ORDER = {"Pending": 0, "Running": 1, "Succeeded": 2}


def _status(obj: dict) -> dict:
    return {"status": obj.get("status") or {}}


def test_a_finishing_stage_is_written_once_not_sent_back_to_pending(cluster, tmp_path):
    """The Job controller (1.35) reports an ended pod first in ``uncountedTerminatedPods``
    (``active`` and ``ready`` 0, ``succeeded`` not yet 1), then counts it, then marks the Job
    Complete. The operator read that moment as "waiting for resources": every stage went
    Running -> Pending -> Succeeded, one status patch more per transition (5 writes; the
    500-run bench's goal is at most 4). Each stage's record must only move forward, and the
    run is written at most twice per stage (started, pods running) plus once at the end."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.wait_established("visionr1runs.visionr1.io")
    ensure_namespace(cluster, NAMESPACE)
    run = "w1"
    # Each pod is Running (kwok's default) and ends with exit 0 2 s later.
    cluster.kubectl_apply(exit_stage(f"{run}-pods", {"visionr1.io/run": run}, exit_code=0, after_seconds=2))
    log = tmp_path / "operator.log"
    with Watch(cluster, f"/apis/visionr1.io/v1alpha1/namespaces/{NAMESPACE}/visionr1runs",
               project=_status) as runs, operator_process(cluster.kubeconfig, ["--standalone"], log):
        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(run, NAMESPACE)))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            events = [e for e in runs.snapshot() if e.name == run]
            if events and events[-1].obj["status"].get("phase") == "Succeeded":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the run did not succeed: {log.read_text()[-3000:]}")
    try:
        statuses = []
        for event in events:
            if not statuses or event.obj["status"] != statuses[-1]:
                statuses.append(event.obj["status"])
        stages = [r["name"] for r in statuses[-1]["stages"]]
        for name in stages:
            states = [next((r["state"] for r in s.get("stages") or [] if r["name"] == name), "Pending")
                      for s in statuses]
            assert [ORDER[s] for s in states] == sorted(ORDER[s] for s in states), (name, states)
        writes = len([s for s in statuses if s])
        assert writes <= 2 * len(stages) + 1, (writes, [[r["state"] for r in s.get("stages") or []]
                                                        for s in statuses])
    finally:
        cluster.kubectl("delete", "vr1", run, "-n", NAMESPACE, "--timeout=60s", check=False)
        cluster.kubectl("delete", "stage", f"{run}-pods", check=False)
