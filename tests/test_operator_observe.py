"""observe_job on the Job statuses the real Job controller (1.35) writes while an attempt ends."""

from __future__ import annotations

from visionr1_operator.cluster import observe

STARTED = "2026-01-01T00:00:00Z"


def job(status: dict, parallelism: int = 1) -> dict:
    return {
        "metadata": {"name": "r-sft-1", "labels": {"visionr1.io/stage": "sft", "visionr1.io/attempt": "1"},
                     "ownerReferences": [{"kind": "VisionR1Run", "uid": "u1"}]},
        "spec": {"suspend": False, "parallelism": parallelism, "completions": parallelism},
        "status": {"startTime": STARTED, **status},
    }


def test_pods_waiting_then_running():
    assert observe.observe_job(job({"active": 1, "ready": 0})).state == "Starting"
    assert observe.observe_job(job({"active": 1, "ready": 1})).state == "Running"
    assert observe.observe_job(job({"active": 2, "ready": 1}, parallelism=2)).state == "Starting"


def test_a_job_whose_pods_ended_is_finishing_not_waiting_for_resources():
    """The Job controller first lists an ended pod in uncountedTerminatedPods (active and
    ready 0, succeeded not yet 1), removes its tracking finalizer, then counts it; it marks
    the Job SuccessCriteriaMet / FailureTarget before Complete / Failed. Read as "Starting",
    a stage that had run went back to Pending for a status write of its own on every stage."""
    ending = job({"active": 0, "ready": 0, "uncountedTerminatedPods": {"succeeded": ["pod-uid"]}})
    assert observe.observe_job(ending).state == "Finishing"
    counted = job({"active": 0, "ready": 0, "succeeded": 1, "uncountedTerminatedPods": {}})
    assert observe.observe_job(counted).state == "Finishing"
    criteria = job({"active": 0, "ready": 0, "succeeded": 1,
                    "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]})
    assert observe.observe_job(criteria).state == "Finishing"
    failing = job({"active": 0, "ready": 0, "uncountedTerminatedPods": {"failed": ["pod-uid"]},
                   "conditions": [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]})
    assert observe.observe_job(failing).state == "Finishing"
    # One of two pods done, the other still waiting for a node: not running yet.
    half = job({"active": 1, "ready": 0, "uncountedTerminatedPods": {"succeeded": ["pod-uid"]}}, parallelism=2)
    assert observe.observe_job(half).state == "Starting"
    # Once the controller is done: the outcome.
    complete = job({"succeeded": 1, "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                                    {"type": "Complete", "status": "True"}]})
    assert observe.observe_job(complete).state == "Succeeded"


def test_a_finishing_job_leaves_its_stage_record_as_it_is_until_the_outcome():
    """Pending (its pods ran between two of the Job's status updates) or Running: the record
    does not move while the Job controller finishes the Job, so the outcome is one write."""
    from test_operator_reconcile import Sim

    for seen in ("Starting", "Running"):
        sim = Sim()
        sim.step()
        sim.set_job("r-bridge-1", seen)
        sim.step()
        before = sim.status.model_copy(deep=True)
        sim.set_job("r-bridge-1", "Finishing")
        assert sim.step().status == before, seen
        sim.succeed("r-bridge-1")
        assert sim.record("bridge").state == "Succeeded" and sim.record("sft").state == "Pending"
