"""`helm uninstall` leaves every run deletable (issue 14, item 8), on the real control plane.

The operator (as a process, with a TokenRequest token of the chart's ServiceAccount) has
put kopf's finalizer on a run and its own on the run's running Job. ``helm uninstall``
runs the chart's pre-delete hook Job; kwok plays its pod without running it, so the
hook's exact command (from the rendered chart) runs here as a process with the same
token, as the hook's pod would, before ``helm uninstall``. Afterwards ``kubectl delete``
of the run returns, and the garbage collector takes its Job and pods, with no operator.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from chart_harness import of_kind, render
from cluster_harness import (
    CHART_NAMESPACE,
    RELEASE,
    ensure_namespace,
    helm,
    install_chart,
    installed_operator,
    operator_process,
    service_account_kubeconfig,
    wait_until,
)
from kwok_stages import exit_stage
from operator_harness import run_manifest
from test_cluster_outcomes import apply_crd, job_or_none

from visionr1_operator.cluster.handlers import FINALIZER
from visionr1_operator.cluster.naming import JOB_FINALIZER, LABEL_RUN, LABEL_STAGE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

NAMESPACE = "uninstall"


def hook_command(values: dict, deployment: str) -> list[str]:
    """The hook's command as the chart renders it, for the release installed as ``deployment``."""
    objects = render(values)
    (job,) = [j for j in of_kind(objects, "Job")
              if j["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "visionr1_operator.cluster.uninstall"]
    (rendered,) = of_kind(objects, "Deployment")
    stop = f"--stop-deployment={rendered['metadata']['namespace']}/{rendered['metadata']['name']}"
    args = [str(a) for a in container["args"]]
    assert stop in args  # the hook stops the chart's own Deployment (renders use another release name)
    args[args.index(stop)] = f"--stop-deployment={CHART_NAMESPACE}/{deployment}"
    return [sys.executable, "-m", "visionr1_operator.cluster.uninstall", *args]


def test_helm_uninstall_leaves_runs_and_their_jobs_deletable_without_the_operator(cluster, tmp_path):
    apply_crd(cluster)
    ensure_namespace(cluster, NAMESPACE)
    install_chart(cluster, {})
    name = "left"
    cluster.kubectl_apply(exit_stage("left-bridge-runs", {LABEL_RUN: name, LABEL_STAGE: "bridge"},
                                     exit_code=0, after_seconds=600))
    try:
        account, args = installed_operator(cluster)
        kubeconfig = service_account_kubeconfig(cluster, account, tmp_path / "operator.kubeconfig")
        with operator_process(kubeconfig, args, tmp_path / "operator.log"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(name, NAMESPACE)))
            job = wait_until(lambda: (j := job_or_none(cluster, f"{name}-bridge-1", NAMESPACE))
                             and (j.get("status") or {}).get("active") and j, 90, "the bridge Job running")
            run = json.loads(cluster.kubectl("get", "vr1", name, "-n", NAMESPACE, "-o", "json").stdout)
        assert FINALIZER in run["metadata"]["finalizers"] and JOB_FINALIZER in job["metadata"]["finalizers"]

        deployment = json.loads(cluster.kubectl("get", "deployment", "-n", CHART_NAMESPACE, "-l",
                                                f"app.kubernetes.io/instance={RELEASE}", "-o", "json").stdout)
        hook = subprocess.run([*hook_command({}, deployment["items"][0]["metadata"]["name"]),
                               f"--kubeconfig={kubeconfig}", "--timeout=90"],
                              capture_output=True, text=True, timeout=150)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert f"from Job {NAMESPACE}/{name}-bridge-1" in hook.stdout, hook.stdout
        assert f"from VisionR1Run {NAMESPACE}/{name}" in hook.stdout, hook.stdout
        run = json.loads(cluster.kubectl("get", "vr1", name, "-n", NAMESPACE, "-o", "json").stdout)
        job = job_or_none(cluster, f"{name}-bridge-1", NAMESPACE)
        assert not run["metadata"].get("finalizers") and not job["metadata"].get("finalizers"), (run, job)
        deployment = json.loads(cluster.kubectl("get", "deployment", "-n", CHART_NAMESPACE, "-l",
                                                f"app.kubernetes.io/instance={RELEASE}", "-o", "json").stdout)
        assert deployment["items"][0]["spec"]["replicas"] == 0  # the operator stopped first
        helm(cluster).uninstall(RELEASE, timeout=120)

        # No operator anywhere now: deleting the run still works, and its Job goes with it.
        cluster.kubectl("delete", "vr1", name, "-n", NAMESPACE, "--timeout=60s")
        wait_until(lambda: job_or_none(cluster, f"{name}-bridge-1", NAMESPACE) is None, 90, "the run's Job gone")
    finally:
        cluster.kubectl("delete", "stage", "left-bridge-runs", check=False)
        helm(cluster).uninstall(RELEASE, timeout=120, ignore_not_found=True)
