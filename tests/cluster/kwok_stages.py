"""kwok Stage objects: how the fake nodes and their pods behave.

kwok runs with ``--enable-crds=Stage``, so every behaviour is a Stage object in the API
server. At start the control plane installs kwok's own defaults, read from the pinned
kwok module's source (``kustomize/stage``): nodes become Ready and keep a heartbeat;
pods become Running at once; a Job's pods then Succeed with exit code 0; deleted pods
go away.

Those defaults are installed with **weight 0**. kwok picks among the Stages that match a
pod by weight, and a weight-0 Stage is never picked while a matching Stage of positive
weight exists (``lifecycle.Match``). So a test overrides the defaults for its own pods
by creating a Stage of weight 1 that selects them, for example by the operator's
labels::

    plane.kubectl_apply(exit_stage("sft-exits-3", {"visionr1.io/run": "r1",
                                                   "visionr1.io/stage": "sft"},
                                      exit_code=3, after_seconds=5))

Deleting that Stage restores the default for pods that have not finished yet. A pod
that should stay Running for a while is one that exits 0 after that while.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DEFAULTS = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat/node-heartbeat.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


def crd_yaml(kwok_source: Path) -> str:
    return (kwok_source / "kustomize" / "crd" / "bases" / "kwok.x-k8s.io_stages.yaml").read_text()


def default_stages_yaml(kwok_source: Path) -> str:
    docs = []
    for name in DEFAULTS:
        stage = yaml.safe_load((kwok_source / "kustomize" / "stage" / name).read_text())
        stage["spec"]["weight"] = 0
        stage["spec"].pop("weightFrom", None)
        docs.append(yaml.safe_dump(stage, sort_keys=False))
    return "---\n".join(docs)


def _label_expressions(labels: dict[str, str]) -> list[dict]:
    return [
        {"key": f'.metadata.labels["{key}"]', "operator": "In", "values": [value]}
        for key, value in sorted(labels.items())
    ]


def exit_stage(name: str, labels: dict[str, str], exit_code: int, after_seconds: float = 0,
                  message: str = "", up_to_seconds: float | None = None,
                  namespace: str | None = None) -> str:
    """A Stage that ends the matching Running pods with ``exit_code`` after ``after_seconds``.

    ``message`` becomes each container's termination message (what a stage writes as its
    summary on exit), so a test can play a trainer's exit summary too. With
    ``up_to_seconds`` each pod ends at a random time between the two (kwok's jitter);
    ``namespace`` selects every pod of that namespace (``labels`` may then be empty).
    """
    phase = "Succeeded" if exit_code == 0 else "Failed"
    reason = "Completed" if exit_code == 0 else "Error"
    template = (
        "{{ $now := Now }}\n"
        "containerStatuses:\n"
        "{{ range $index, $item := .spec.containers }}\n"
        "- image: {{ $item.image | Quote }}\n"
        "  name: {{ $item.name | Quote }}\n"
        "  ready: false\n"
        "  restartCount: 0\n"
        "  started: false\n"
        "  state:\n"
        "    terminated:\n"
        f"      exitCode: {int(exit_code)}\n"
        "      finishedAt: {{ $now | Quote }}\n"
        f"      reason: {reason}\n"
        f"      message: {json.dumps(message)}\n"
        "      startedAt: {{ $now | Quote }}\n"
        "{{ end }}\n"
        f"phase: {phase}\n"
    )
    stage = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": [
                {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                *_label_expressions(labels),
                *([{"key": ".metadata.namespace", "operator": "In", "values": [namespace]}] if namespace else []),
            ]},
            "weight": 1,
            "delay": {"durationMilliseconds": int(after_seconds * 1000),
                      **({"jitterDurationMilliseconds": int(up_to_seconds * 1000)} if up_to_seconds else {})},
            "next": {"statusTemplate": template},
        },
    }
    return yaml.safe_dump(stage, sort_keys=False)

