"""Helpers for the tests on the real control plane (not a test module).

``install_chart`` installs the Helm chart with Helm's own engine (helm-python-sdk);
``service_account_kubeconfig`` asks the TokenRequest API for a token of the chart's
ServiceAccount, so the operator runs with exactly the chart's permissions, judged by
the real RBAC authorizer; ``operator_process`` runs ``python -m visionr1_operator``
with the chart's own flags against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import helm_python
import yaml
from chart_harness import CHART

RELEASE, CHART_NAMESPACE = "visionr1-operator", "visionr1-system"


def helm(cluster) -> helm_python.Config:
    return helm_python.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=CHART_NAMESPACE)


def install_chart(cluster, values: dict[str, Any]):
    return helm(cluster).install(str(CHART), RELEASE, values, namespace=CHART_NAMESPACE,
                                 create_namespace=True, timeout=120)


def ensure_namespace(cluster, name: str) -> None:
    cluster.kubectl_apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
    # Pods are refused until the namespace's default ServiceAccount exists.
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name}"
        time.sleep(0.3)


def service_account_kubeconfig(cluster, service_account: str, path: Path) -> Path:
    """A kubeconfig for ``service_account`` in the chart's namespace, with a bound token
    from the TokenRequest API (what the kubelet would mount into the operator's pod)."""
    token = cluster.kubectl("create", "token", service_account, "-n", CHART_NAMESPACE,
                            "--duration=2h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    admin["users"] = [{"name": service_account, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = service_account
    admin["contexts"][0]["context"]["namespace"] = CHART_NAMESPACE
    path.write_text(yaml.safe_dump(admin))
    return path


def installed_operator(cluster) -> tuple[str, list[str]]:
    """The ServiceAccount and the container args of the Deployment Helm installed."""
    deployments = json.loads(cluster.kubectl(
        "get", "deployments", "-n", CHART_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}",
        "-o", "json").stdout)["items"]
    assert len(deployments) == 1, [d["metadata"]["name"] for d in deployments]
    pod = deployments[0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod["serviceAccountName"], [str(a) for a in container["args"]]


@contextlib.contextmanager
def operator_process(kubeconfig: Path, chart_args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """The operator with the flags the installed chart's Deployment gives it (ports moved
    aside: several run on one machine)."""
    from controlplane import free_port

    args = [a for a in chart_args if not a.startswith(("--metrics-port", "--health-port"))]
    cmd = [sys.executable, "-m", "visionr1_operator", *args, f"--kubeconfig={kubeconfig}",
           "--metrics-port=0", f"--health-port={free_port()}", "--retry-base=1", "--retry-max=2"]
    env = {**os.environ, "POD_ID": "test-operator"}
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def forbidden_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines()
            if "Forbidden" in line or " 403" in line or "forbidden" in line]


def get_json(cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
