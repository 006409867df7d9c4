"""Render the Helm chart with real Helm (helm-python-sdk) and pick objects out of it.

Not a test module. The value sets here are the ones the issue asks for beside the
defaults: namespaced mode, HA, monitoring on, custom images (and HA in namespaced mode).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "visionr1-operator"
RELEASE, NAMESPACE = "vr1", "visionr1-system"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["research", "team-a"]},
    "ha": {"ha": {"enabled": True, "replicas": 3}},
    "ha-namespaced": {"ha": {"enabled": True}, "watchNamespaces": ["research"]},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "podMonitor": {"enabled": True, "interval": "10s"}},
        "grafana": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                  "annotations": {"grafana_folder": "VisionR1"}}},
    },
    "policy": {"policy": {"serviceAccounts": ["default", "trainer"], "priorityClasses": ["research-low"],
                          "imagePrefixes": ["registry.example.com/ml/"]}},
    "custom-images": {
        "image": {"repository": "registry.example.com/ml/visionr1-operator", "tag": "0.1.0-rc1",
                  "pullPolicy": "Always"},
        "trainer": {"image": {"repository": "registry.example.com/ml/visionr1-trainer", "tag": "cu128-0.1.0"}},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "serviceAccount": {"name": "vr1-operator", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
    },
}


@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    return dict(_render(json.dumps(values or {}, sort_keys=True)))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` (templates only; CRDs are in ``crds()``)."""
    out = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".yaml"):
            out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def crds() -> list[dict[str, Any]]:
    return [doc for path in sorted((CHART / "crds").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_args(values: dict[str, Any] | None = None) -> list[str]:
    """The command-line flags the chart gives ``python -m visionr1_operator``."""
    deployment = one(render(values), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["args"]]
