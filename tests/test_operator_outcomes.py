"""The pure parts of issue 14's lifecycle fixes: when a Job may go, refused creates,
lost status patches, readiness (outcomes.py, reconcile.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from test_operator_reconcile import Sim

from visionr1_operator.api import StageStatus, VisionR1RunStatus
from visionr1_operator.cluster.naming import JOB_FINALIZER
from visionr1_operator.cluster.observe import JobView, observe_job
from visionr1_operator.cluster.outcomes import outcome_recorded, releasable, ttl_due


def job(name="r-sft-1", stage="sft", attempt=1, state="Failed", **fields) -> JobView:
    return JobView(name, stage, attempt, "u1", state, finalizer=True, **fields)


def status(**record) -> VisionR1RunStatus:
    return VisionR1RunStatus(stages=[StageStatus(name="sft", kind="sft", **record)])


def test_a_failed_attempt_is_recorded_only_once_its_retry_started_or_the_stage_failed():
    failed = job(deleting=True)
    assert not outcome_recorded(failed, {r.name: r for r in status(state="Running", attempts=1).stages})
    assert releasable(status(state="Running", attempts=1, jobName="r-sft-1"), [failed]) == []  # in its backoff
    assert releasable(status(state="Running", attempts=2, failures=1), [failed]) == ["r-sft-1"]
    assert releasable(status(state="Failed", attempts=1, failures=2), [failed]) == ["r-sft-1"]


def test_only_deleted_jobs_are_released_and_an_unfinished_one_at_once():
    recorded = status(state="Succeeded", attempts=1)
    assert releasable(recorded, [job(state="Succeeded")]) == []  # not deleted: no write for it
    assert releasable(recorded, [job(state="Succeeded", deleting=True)]) == ["r-sft-1"]
    assert releasable(status(state="Running", attempts=1), [job(state="Running", deleting=True)]) == ["r-sft-1"]
    assert releasable(recorded, [replace(job(state="Succeeded", deleting=True), finalizer=False)]) == []


def test_the_ttl_is_given_once_the_outcome_is_recorded():
    ttl = {"sft": 0}
    assert ttl_due([job(state="Succeeded")], status(state="Running", attempts=1), ttl) == {}
    assert ttl_due([job(state="Succeeded")], status(state="Succeeded", attempts=1), ttl) == {"r-sft-1": 0}
    assert ttl_due([job(state="Succeeded", ttl=0)], status(state="Succeeded", attempts=1), ttl) == {}
    assert ttl_due([job(state="Succeeded")], status(state="Succeeded", attempts=1), {"sft": None}) == {}


def test_observe_job_reads_finalizer_deletion_ttl_and_whether_pods_are_up():
    body = {"metadata": {"name": "r-sft-1", "uid": "j1", "finalizers": [JOB_FINALIZER],
                         "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"visionr1.io/stage": "sft", "visionr1.io/attempt": "1"}},
            "spec": {"parallelism": 2, "ttlSecondsAfterFinished": 5},
            "status": {"startTime": "2026-01-01T00:00:00Z", "active": 2, "ready": 1}}
    view = observe_job(body)
    assert (view.finalizer, view.deleting, view.ttl, view.state) == (True, True, 5, "Starting")
    body["status"]["ready"] = 2
    assert observe_job(body).state == "Running"
    del body["status"]["ready"]  # an API server that does not report ready pods
    assert observe_job(body).state == "Running"


def test_a_refused_create_retries_with_backoff_then_fails_the_stage():
    sim = Sim()
    sim.step()
    sim.jobs.clear()  # the create was refused: no Job
    refusal = ("jobs.batch is forbidden: exceeded quota: no-jobs", sim.now)
    d = _step(sim, {"r-bridge-1": refusal})
    bridge = sim.record("bridge")
    assert d.start is None and bridge.state == "Pending" and "exceeded quota" in bridge.message
    assert sim.condition("Ready").reason == "CreateRefused" and "exceeded quota" in sim.condition("Ready").message
    assert d.requeue_after is not None and d.requeue_after > 0
    sim.now += timedelta(seconds=60)
    d = _step(sim, {"r-bridge-1": refusal})
    assert d.start is not None and d.start.attempt == 1 and sim.record("bridge").failures == 1
    assert [e.reason for e in d.events] == ["CreateRefused"]
    sim.jobs.clear()
    d = _step(sim, {"r-bridge-1": (refusal[0], sim.now)})  # refused again: backoffLimit 1 reached
    bridge = sim.record("bridge")
    assert (bridge.state, bridge.failures, sim.status.phase) == ("Failed", 2, "Failed")
    assert "backoffLimit 1" in bridge.message and "exceeded quota" in bridge.message


def _step(sim: Sim, refused):
    from visionr1_operator.cluster.controller import parse_run
    from visionr1_operator.cluster.reconcile import Observed, decide
    from test_operator_reconcile import SETTINGS

    run, problems = parse_run(sim.doc)
    obs = Observed(name="r", namespace="default", generation=sim.generation, run=run, problems=problems,
                   status=sim.status, jobs=dict(sim.jobs), reports=dict(sim.reports), now=sim.now,
                   refused=refused)
    decision = decide(obs, SETTINGS)
    sim.status = decision.status
    return decision


def test_a_lost_status_patch_keeps_the_failures_of_the_attempts_it_skipped():
    sim = Sim()
    sim.step()
    sim.set_job("r-bridge-1", "Running")
    sim.step()
    before = sim.status
    sim.fail("r-bridge-1")
    sim.now += timedelta(seconds=60)
    d = sim.step()
    assert d.start is not None and d.start.attempt == 2 and sim.record("bridge").failures == 1
    sim.status = before  # the patch that said attempt 2 and failures 1 was lost
    sim.step()
    assert (sim.record("bridge").attempts, sim.record("bridge").failures) == (2, 1)


def test_a_queue_name_that_cannot_be_a_label_value_is_refused():
    import pytest
    from operator_harness import run_manifest

    from visionr1_operator.manifest import ManifestError, validate_document

    validate_document(run_manifest("q", queueName="q" * 63), source="run.yaml")
    with pytest.raises(ManifestError) as refused:
        validate_document(run_manifest("q", queueName="q" * 64), source="run.yaml")
    assert any(path == "spec.queueName" for path, _ in refused.value.problems), refused.value.problems
