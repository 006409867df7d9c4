"""The chart, the operator and kubectl on the real control plane (tests/cluster/).

For each install mode (cluster-wide; namespaced, watching ``research``): Helm's own
engine installs the chart; the operator runs as a process with a TokenRequest token of
the chart's ServiceAccount, so every call it makes is judged by the real RBAC
authorizer; a run goes through every stage (bridge, SFT, PTST 1 and 2, eval), each a
Job run by the real Job controller whose pods the real scheduler binds to the fake GPU
nodes; ``kubectl get -w`` and ``kubectl wait --for=condition=Succeeded`` follow it;
``kubectl delete`` leaves nothing the run owned; Helm upgrades and uninstalls the
release and the CRD and the runs stay.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_harness import (
    CHART_NAMESPACE,
    RELEASE,
    ensure_namespace,
    forbidden_lines,
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

from visionr1_operator.cluster.naming import LABEL_RUN

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "research"
MODES = {
    "cluster-wide": {},
    "namespaced": {"watchNamespaces": [NAMESPACE]},
}
STAGES = ["bridge", "sft", "ptst-1", "ptst-2", "eval"]


def kubectl_cmd(cluster, *args: str) -> list[str]:
    from controlplane import kubectl_binary

    return [kubectl_binary(), f"--kubeconfig={cluster.kubeconfig}",
            f"--cache-dir={cluster.cluster_dir / 'kube-cache'}", *args]


def owned_objects(cluster, run: str) -> list[str]:
    out = cluster.kubectl("get", "configmaps,services,jobs,pods", "-n", NAMESPACE,
                          "-l", f"{LABEL_RUN}={run}", "-o", "name")
    return out.stdout.split()


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_operator_with_the_charts_permissions_takes_a_run_through_every_stage(mode, cluster, tmp_path):
    values = MODES[mode]
    ensure_namespace(cluster, NAMESPACE)
    release = install_chart(cluster, values)
    assert release is not None
    try:
        sa, chart_args = installed_operator(cluster)
        kubeconfig = service_account_kubeconfig(cluster, sa, tmp_path / "operator.kubeconfig")
        log = tmp_path / "operator.log"
        run = f"everything-{mode}"
        # The bridge stage's pod runs for 3 s: a run is Running only while its pods are up
        # (kwok's default pods finish as soon as they are ready).
        cluster.kubectl_apply(exit_stage(f"{run}-bridge-runs", {LABEL_RUN: run, "visionr1.io/stage": "bridge"},
                                         exit_code=0, after_seconds=3))
        with operator_process(kubeconfig, chart_args, log) as operator:
            watch = subprocess.Popen(
                kubectl_cmd(cluster, "get", "vr1", "-n", NAMESPACE, "-w", "--no-headers", "-o",
                            "custom-columns=NAME:.metadata.name,PHASE:.status.phase,STAGE:.status.currentStage"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            cluster.kubectl("apply", "-f", "-", input=json.dumps(run_manifest(run, NAMESPACE)))
            waited = cluster.kubectl("wait", "--for=condition=Succeeded", f"vr1/{run}", "-n", NAMESPACE,
                                     "--timeout=300s", check=False, timeout=330)
            assert operator.poll() is None, log.read_text()[-3000:]
            assert forbidden_lines(log) == [], "\n".join(forbidden_lines(log))
            assert waited.returncode == 0, (waited.stderr, log.read_text()[-4000:])
            watch.terminate()
            seen = watch.communicate(timeout=10)[0]

            status = get_json(cluster, "vr1", run, "-n", NAMESPACE)["status"]
            assert status["phase"] == "Succeeded"
            assert [s["name"] for s in status["stages"]] == STAGES
            for record in status["stages"]:
                assert record["state"] == "Succeeded", record
                job = get_json(cluster, "job", record["jobName"], "-n", NAMESPACE)
                # The real Job controller marked it complete; the real scheduler placed its pod.
                assert job["status"].get("succeeded") == 1, job["status"]
                conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
                assert conditions.get("Complete") == "True"
            pods = get_json(cluster, "pods", "-n", NAMESPACE, "-l", f"{LABEL_RUN}={run}")["items"]
            assert pods and all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods)
            # kubectl get -w printed the run as it moved: running stages, then Succeeded.
            phases = [line.split()[1] for line in seen.splitlines() if line.startswith(run) and len(line.split()) > 1]
            assert "Running" in phases and phases[-1] == "Succeeded", seen
            assert forbidden_lines(log) == [], "\n".join(forbidden_lines(log))

            # kubectl delete: the run's finalizer goes, and the garbage collector takes
            # every ConfigMap, Service, Job and pod the run owned.
            assert owned_objects(cluster, run)
            cluster.kubectl("delete", "vr1", run, "-n", NAMESPACE, "--timeout=120s")
            wait_until(lambda: owned_objects(cluster, run) == [], 120, "the run's objects to go")
            assert forbidden_lines(log) == [], "\n".join(forbidden_lines(log))
    finally:
        _uninstall_keeps_crd_and_runs(cluster)


def _uninstall_keeps_crd_and_runs(cluster) -> None:
    """Helm never deletes a chart's crds/ on uninstall, so neither the CRD nor any run goes."""
    keep = run_manifest("survivor", NAMESPACE)
    keep["spec"]["suspend"] = True
    cluster.kubectl("apply", "-f", "-", input=json.dumps(keep))
    helm(cluster).uninstall(RELEASE, timeout=120)
    assert cluster.kubectl("get", "crd", "visionr1runs.visionr1.io", check=False).returncode == 0
    assert cluster.kubectl("get", "vr1", "survivor", "-n", NAMESPACE, check=False).returncode == 0
    # The Deployment and the RBAC went with the release.
    assert cluster.kubectl("get", "deployment", "-n", CHART_NAMESPACE, "-o", "name").stdout.strip() == ""
    cluster.kubectl("delete", "vr1", "survivor", "-n", NAMESPACE, "--timeout=60s")


def test_helm_upgrade_changes_the_release_in_place(cluster):
    ensure_namespace(cluster, NAMESPACE)
    install_chart(cluster, {})
    try:
        before = get_json(cluster, "deployment", "-n", CHART_NAMESPACE, "-l",
                          f"app.kubernetes.io/instance={RELEASE}")["items"]
        assert len(before) == 1
        helm(cluster).upgrade(str(ROOT / "charts" / "visionr1-operator"), RELEASE,
                              {"operator": {"retryBase": 5}}, namespace=CHART_NAMESPACE, timeout=120)
        after = get_json(cluster, "deployment", before[0]["metadata"]["name"], "-n", CHART_NAMESPACE)
        args = after["spec"]["template"]["spec"]["containers"][0]["args"]
        assert any(a in ("--retry-base=5", "5") for a in args), args
        assert after["metadata"]["generation"] > before[0]["metadata"]["generation"]
    finally:
        _uninstall_keeps_crd_and_runs(cluster)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_rendered_objects_pass_server_side_dry_run(example, cluster):
    """`visionr1 render` prints what the operator creates; the API server accepts all of it."""
    rendered = subprocess.run([_visionr1(), "render", str(example)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    kinds = [line.split()[-2] for line in rendered.stdout.splitlines() if line.startswith("# Source:")]
    assert kinds.count("Job") >= 1 and "ConfigMap" in kinds
    for namespace in {line.split()[2].split("/")[0] for line in rendered.stdout.splitlines()
                      if line.startswith("# Source:")}:
        ensure_namespace(cluster, namespace)
        # The API server's PodSecurity admission warns about any Job whose pods the
        # restricted standard would refuse.
        cluster.kubectl("label", "namespace", namespace, "--overwrite",
                        "pod-security.kubernetes.io/warn=restricted", "pod-security.kubernetes.io/warn-version=v1.35")
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(kinds)
    assert "PodSecurity" not in out.stderr, out.stderr


def _visionr1() -> str:
    return str(Path(sys.executable).parent / "visionr1")

