"""Names, labels and constants shared by the objects of one stage attempt. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import API_VERSION, KIND

MANAGED_BY = "visionr1-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "visionr1.io/run"
LABEL_STAGE = "visionr1.io/stage"
LABEL_ATTEMPT = "visionr1.io/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_CONFIG_HASH = "visionr1.io/config-hash"
# On every attempt's Job from its creation: the Job (and, unless it is deleted in the
# foreground, its pods) stays until the operator has recorded its outcome and exit summary
# in the run's status. Removed then, or at once from a Job deleted before it finished.
JOB_FINALIZER = "visionr1.io/attempt-outcome"
# Set by the Job controller on every pod (and the Job's selector): how we find an attempt's pods.
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

CONTAINER = "trainer"
CONFIG_DIR = "/etc/visionr1"
CONFIG_KEY = "stage.json"
SCRATCH_DIR = "/scratch"
# The read-only root's only other writable path: memory-backed, counted in the pod's memory.
TMP_DIR = "/tmp"
TMP_SIZE = "2Gi"
PVC_ROOT = "/mnt/visionr1/pvc"
RENDEZVOUS_PORT = 29500
# The trainer image runs as this user; runAsNonRoot needs a numeric uid to verify.
RUN_AS_USER = 1000

# podFailurePolicy rules, by index: the Job's failure message names the rule that fired.
RULE_BAD_CONFIG = 0  # exit 2: the trainer cannot use its config, retrying cannot help
RULE_DISRUPTION = 1  # preemption, eviction, node drain: not the application's fault
# The trainer's exit status for an unusable config (visionr1_trainer.runtime.EXIT_BAD_CONFIG;
# not imported: the operator depends on the trainer's config schema only).
EXIT_BAD_CONFIG = 2


@dataclass(frozen=True)
class Owner:
    """The run that owns a stage's objects."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            # Foreground deletion of the run waits for its Jobs (and so their pods) to go.
            "blockOwnerDeletion": True,
        }


# --- names and labels -------------------------------------------------------------------


def job_name(run: str, stage: str, attempt: int) -> str:
    """``<run>-<stage>-<attempt>``: also the ConfigMap's name (at most 51 characters)."""
    return f"{run}-{stage}-{attempt}"


def service_name(job: str) -> str:
    """The headless Service of a multi-node attempt: a DNS-1035 label, so it starts with a letter."""
    return job if job[0].isalpha() else f"vr1-{job}"


def stage_labels(run: str, stage: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: run,
        LABEL_STAGE: stage,
        LABEL_ATTEMPT: str(attempt),
    }
