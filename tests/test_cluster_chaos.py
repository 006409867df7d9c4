"""Chaos on the real control plane, small (issue 14, "Chaos, with nothing lost").

The full size (50 runs, 20 operator SIGKILLs, 2 API server and 1 etcd restarts) is
bench/chaos_bench.py, with its figures in BENCHMARKS.md; the logic and the checks are
tests/cluster/chaos.py. Here: 8 runs of 3 stages, the operator SIGKILLed 6 times at
random moments, the API server restarted once and etcd once, both keeping their data.
"""

from __future__ import annotations

import json

import pytest
from chaos import run_chaos

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def test_restarting_a_component_keeps_its_data(cluster):
    cluster.kubectl("create", "configmap", "survives", "--from-literal=k=v")
    try:
        cluster.restart("etcd", down_seconds=0.5)
        cluster.restart("kube-apiserver", down_seconds=0.5)
        kept = json.loads(cluster.kubectl("get", "configmap", "survives", "-o", "json").stdout)
        assert kept["data"] == {"k": "v"}
    finally:
        cluster.kubectl("delete", "configmap", "survives", "--ignore-not-found", check=False)


def test_nothing_is_lost_when_the_operator_is_killed_and_the_control_plane_restarts(cluster, tmp_path):
    result = run_chaos(cluster, tmp_path, runs=8, kills=6, apiserver_restarts=1, etcd_restarts=1,
                       horizon=30.0, seed=14, timeout=300, namespace="chaos-small")
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    assert result.succeeded == 8, summary
    assert result.problems == [], summary
    assert result.operator_starts == 7 and len(result.actions) == 8, summary
    assert result.jobs_created == 8 * 3, summary
