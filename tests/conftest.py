"""Shared fixtures. The one here: ``cluster``, a real control plane for tests marked ``cluster``.

It is started once per test session, that is once per pytest-xdist worker that runs a
``cluster`` test (tests/cluster/: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok from pinned Go modules; about 15 s to start). ``make test``
distributes by file (``--dist loadfile``), so a file's tests share their module
fixtures. (``--dist loadgroup`` would put every cluster test on one worker, but
pytest-xdist 3.8 cannot group under pytest 9: it renames ``item._nodeid``, which
pytest 9 no longer reads.)

Without Go the cluster tests are skipped with one loud line, unless
``VISIONR1_REQUIRE_CLUSTER=1`` (CI sets it): then a missing or broken control plane
fails the run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

CLUSTER_SRC = Path(__file__).resolve().parent / "cluster"
# The control plane's modules (controlplane, gobuild, pki, kwok_stages) are scripts in a
# folder that `make cluster` runs directly, not a package: tests import them from here.
sys.path.insert(0, str(CLUSTER_SRC))


def _require() -> bool:
    return os.environ.get("VISIONR1_REQUIRE_CLUSTER") == "1"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running control plane (``controlplane.ControlPlane``), stopped at session end."""
    if shutil.which("go") is None and not _require():
        line = "SKIPPED cluster tests: Go is not installed, so the real control plane cannot be built"
        print(f"\n{'!' * len(line)}\n{line}\n{'!' * len(line)}", file=sys.stderr)
        pytest.skip(line)
    import controlplane

    plane = controlplane.ControlPlane(tmp_path_factory.mktemp("cluster"),
                                      nodes=int(os.environ.get("CLUSTER_NODES", "4")),
                                      log=lambda line: print(line, file=sys.stderr))
    try:
        plane.start(timeout=float(os.environ.get("VISIONR1_CLUSTER_TIMEOUT", "240")))
    except Exception as exc:  # a broken control plane is a failure, never a silent skip in CI
        if _require():
            pytest.fail(f"the test control plane did not start: {exc}", pytrace=False)
        pytest.skip(f"the test control plane did not start: {exc}")
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def kueue(cluster):
    """Kueue's manager (built from its pinned Go module, tests/cluster/kueue/) running
    against the session's control plane for one test module; stopped, and its webhooks
    removed, after it. The control plane itself, for convenience."""
    import controlplane
    import gobuild

    try:
        cluster.start_kueue(timeout=float(os.environ.get("VISIONR1_CLUSTER_TIMEOUT", "240")))
    except (controlplane.ControlPlaneError, gobuild.BuildError, PermissionError) as exc:
        cluster.stop_kueue()
        if _require():
            pytest.fail(f"Kueue did not start: {exc}", pytrace=False)
        pytest.skip(f"Kueue did not start: {exc}")
    yield cluster
    cluster.stop_kueue()


@pytest.fixture(autouse=True)
def _no_cloud_metadata(monkeypatch):
    """boto3 looks for credentials and a region at the cloud metadata address when the
    environment has none; no test may ever reach for it (issue 18)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
