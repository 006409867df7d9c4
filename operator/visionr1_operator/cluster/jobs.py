"""Stage plan -> the Kubernetes objects of one attempt. Pure: no I/O.

One attempt of a stage is a ConfigMap (the stage config JSON the trainer reads), a
``batch/v1`` Job running ``python -m visionr1_trainer <kind> --config ...`` and, when the
stage spans several nodes, a headless Service that gives pod 0 the DNS name torchrun's
rendezvous needs. Every object is named ``<run>-<stage>-<attempt>``, labelled, and owned
by the run, so that deleting the run garbage-collects them and a restarted operator finds
them again by name.

The pod template is built in ``pods``; the other direction (reading Jobs and pods back)
is in ``observe``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..api import VisionR1RunSpec
from ..plan import StagePlan
from .naming import (
    ANNOTATION_CONFIG_HASH,
    CONFIG_KEY,
    CONTAINER,
    EXIT_BAD_CONFIG,
    JOB_FINALIZER,
    LABEL_JOB_NAME,
    LABEL_QUEUE,
    RENDEZVOUS_PORT,
    Owner,
    job_name,
    service_name,
    stage_labels,
)
from .pods import pod_metadata, pod_spec


def config_hash(plan: StagePlan) -> str:
    """What decides a stage's outcome: its config (any attempt), image and world size.

    Placement (node selectors, tolerations, priority...) is left out on purpose: moving a
    finished stage's settings for where it ran changes nothing it produced.
    """
    config = {k: v for k, v in plan.config_json().items() if k != "attempt"}
    key = {
        "config": config,
        "image": plan.image,
        "nodes": plan.resources.nodes,
        "gpusPerNode": plan.resources.gpus_per_node,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --- builders ---------------------------------------------------------------------------


def _metadata(owner: Owner, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner.reference()],
    }


def build_config_map(owner: Owner, plan: StagePlan, attempt: int) -> dict[str, Any]:
    """The stage config JSON of one attempt. It holds Secret names, never Secret values."""
    attempt_plan = plan.for_attempt(attempt)
    name = job_name(owner.name, plan.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, name, stage_labels(owner.name, plan.name, attempt)),
        "immutable": True,
        "data": {CONFIG_KEY: config_text(attempt_plan)},
    }


def config_text(plan: StagePlan) -> str:
    """The stage config as its ConfigMap holds it."""
    return json.dumps(plan.config_json(), indent=2, sort_keys=True) + "\n"


def build_service(owner: Owner, plan: StagePlan, attempt: int) -> dict[str, Any] | None:
    """Headless Service for a multi-node attempt (None for one node).

    Pods of an Indexed Job are named ``<job>-<index>`` and, with ``subdomain`` set to this
    Service, resolve as ``<job>-<index>.<service>``: pod 0 is torchrun's master.
    ``publishNotReadyAddresses`` because the rendezvous happens before any pod is ready.
    """
    if plan.resources.nodes <= 1:
        return None
    job = job_name(owner.name, plan.name, attempt)
    labels = stage_labels(owner.name, plan.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(job), labels),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: job},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def build_job(owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int, *, suspend: bool) -> dict[str, Any]:
    """The batch/v1 Job of one attempt.

    ``backoffLimit: 0``: the operator, not the Job controller, retries a failed attempt, as
    a new Job whose config carries the next attempt number (the trainer resumes from the
    stage's last committed checkpoint), and for a multi-node stage the whole group restarts
    together, as torchrun's static rendezvous needs. ``podFailurePolicy`` tells the causes
    apart: exit code 2 (unusable config) fails at once, a disruption (preemption, eviction,
    drain) is not the application's fault: one pod is simply replaced, several nodes fail
    the attempt with a rule the operator recognises and retries without counting it.
    """
    r = plan.resources
    name = job_name(owner.name, plan.name, attempt)
    labels = stage_labels(owner.name, plan.name, attempt)
    meta_labels = dict(labels)
    if spec.queue_name:
        meta_labels[LABEL_QUEUE] = spec.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": r.nodes,
        "parallelism": r.nodes,
        "suspend": suspend,
        # Required with podFailurePolicy: a replacement starts once the old pod is gone.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": _failure_rules(multi_node=r.nodes > 1)},
        "template": {
            "metadata": pod_metadata(labels, plan),
            "spec": pod_spec(owner, spec, plan, attempt),
        },
    }
    if r.nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if plan.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = plan.active_deadline_seconds
    # ttlSecondsAfterFinished is set only once the run's status records the outcome
    # (``outcomes.ttl_due``): the TTL controller deletes a Job in the foreground, its pods
    # first, which could be before the operator read their exit summary (an operator
    # down longer than the TTL).
    metadata = _metadata(owner, name, meta_labels)
    metadata["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(plan)}
    metadata["finalizers"] = [JOB_FINALIZER]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def build_stage_objects(
    owner: Owner, spec: VisionR1RunSpec, plan: StagePlan, attempt: int, *, suspend: bool
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order: the Job last, so its pods find the rest."""
    objects = [build_config_map(owner, plan, attempt)]
    service = build_service(owner, plan, attempt)
    if service is not None:
        objects.append(service)
    objects.append(build_job(owner, spec, plan, attempt, suspend=suspend))
    return objects


def _failure_rules(multi_node: bool) -> list[dict[str, Any]]:
    # The order matters: a failed Job's message names the index of the rule that fired.
    return [
        {  # RULE_BAD_CONFIG
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_CONFIG]},
        },
        {  # RULE_DISRUPTION
            # One node: the Job controller replaces the pod and the stage resumes in the
            # same attempt. Several: the peers of a lost pod cannot go on, so the attempt
            # fails with this rule and the operator restarts the group without counting it.
            "action": "FailJob" if multi_node else "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        },
    ]
