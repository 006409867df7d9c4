"""The reconcile as a pure function: observed state in, actions and status out (no cluster)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest
from operator_harness import run_manifest

from visionr1_operator.api import Progress, VisionR1RunStatus
from visionr1_operator.cluster.controller import parse_run
from visionr1_operator.cluster.observe import JobView, PodReport
from visionr1_operator.cluster.reconcile import Decision, Observed, ReconcileSettings, decide
from visionr1_operator.cluster.status import merge_patch, status_document

SETTINGS = ReconcileSettings(default_image="visionr1/trainer:test", retry_base_seconds=10, retry_max_seconds=300)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
STAGES = ["bridge", "sft", "ptst-1", "ptst-2", "eval"]


def manifest(**spec) -> dict:
    doc = run_manifest("r")
    doc["metadata"]["uid"] = "u1"
    doc["spec"].update(spec)
    return doc


class Sim:
    """A run's observed world, moved along by the test: the spec, the Jobs, the clock."""

    def __init__(self, doc: dict | None = None):
        self.doc = doc or manifest()
        self.status = VisionR1RunStatus()
        self.jobs: dict[str, JobView] = {}
        self.reports: dict[str, PodReport] = {}
        self.now = T0
        self.generation = 1

    def step(self, progress: Progress | None = None) -> Decision:
        run, problems = parse_run(self.doc)
        obs = Observed(
            name="r", namespace="default", generation=self.generation, run=run, problems=problems,
            status=self.status, jobs=dict(self.jobs), reports=dict(self.reports), now=self.now, progress=progress,
        )
        decision = decide(obs, SETTINGS)
        if decision.start is not None:  # what the controller does: create the Job
            s = decision.start
            self.jobs[s.job_name] = JobView(s.job_name, s.plan.name, s.attempt, "u1",
                                            "Suspended" if s.suspend else "Pending")
        for name, suspend in decision.suspend_jobs.items():
            self.jobs[name] = _with(self.jobs[name], state="Suspended" if suspend else "Running")
        self.status = decision.status
        return decision

    def set_job(self, name: str, state: str, **fields) -> None:
        self.jobs[name] = _with(self.jobs[name], state=state, **fields)

    def succeed(self, name: str, summary: dict | None = None) -> Decision:
        self.set_job(name, "Succeeded", finished_at="2026-01-01T00:00:00Z")
        self.reports[name] = PodReport(summary=summary)
        return self.step()

    def fail(self, name: str, reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit",
             failure="pod x exited with code 1: RuntimeError: boom") -> Decision:
        self.set_job(name, "Failed", reason=reason, message=message,
                     finished_at=self.now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.reports[name] = PodReport(failure=failure)
        return self.step()

    def edit(self, change) -> None:
        self.doc = copy.deepcopy(self.doc)
        change(self.doc["spec"])
        self.generation += 1

    def record(self, stage: str):
        return next(r for r in self.status.stages if r.name == stage)

    def condition(self, type_: str):
        return next(c for c in self.status.conditions if c.type == type_)


def _with(job: JobView, **fields) -> JobView:
    return JobView(**{**job.__dict__, **fields})


def test_a_new_run_starts_its_first_stage():
    sim = Sim()
    d = sim.step()
    assert d.start is not None and (d.start.plan.name, d.start.attempt, d.start.suspend) == ("bridge", 1, False)
    assert [r.name for r in sim.status.stages] == STAGES
    bridge = sim.record("bridge")
    # Created, but its pods are not up: the run waits, it does not run yet (issue 14, item 6).
    assert (bridge.state, bridge.attempts, bridge.job_name) == ("Pending", 1, "r-bridge-1")
    assert bridge.config_hash and bridge.start_time == "2026-01-01T00:00:00Z"
    assert (sim.status.phase, sim.status.current_stage, sim.status.observed_generation) == ("Pending", "bridge", 1)
    assert (sim.condition("Ready").status, sim.condition("Ready").reason) == ("False", "WaitingForResources")
    sim.set_job("r-bridge-1", "Starting")  # pods created, Pending: still waiting
    sim.step()
    assert sim.status.phase == "Pending" and sim.condition("Ready").reason == "WaitingForResources"
    sim.set_job("r-bridge-1", "Running")
    sim.step()
    assert (sim.record("bridge").state, sim.status.phase) == ("Running", "Running")
    assert {c.type: c.status for c in sim.status.conditions} == {
        "Ready": "True", "Succeeded": "False", "Failed": "False", "Suspended": "False", "InvalidSpec": "False"}
    assert sim.condition("Ready").reason == "StageRunning"
    # Nothing changed since: the same decision again is no action (idempotent).
    again = sim.step()
    assert again.start is None and again.events == [] and again.status == sim.status


def test_each_success_starts_the_next_stage_until_the_run_succeeds():
    sim = Sim()
    sim.step()
    for i, stage in enumerate(STAGES):
        d = sim.succeed(f"r-{stage}-1", {"step": 3, "reward": 0.5, "artifactUri": f"s3://vr1/runs/default/r/{stage}/model"})
        record = sim.record(stage)
        assert record.state == "Succeeded" and record.summary["step"] == 3
        assert record.artifact_uri == f"s3://vr1/runs/default/r/{stage}"
        if i + 1 < len(STAGES):
            nxt = STAGES[i + 1]
            assert d.start.plan.name == nxt and sim.status.current_stage == nxt
            assert sim.status.progress == Progress(stage=nxt)
    assert d.finished and d.start is None
    assert sim.status.phase == "Succeeded" and sim.status.current_stage is None
    assert sim.condition("Succeeded").status == "True" and sim.condition("Ready").status == "True"
    assert [e.reason for e in d.events] == ["Succeeded"]


def test_the_eval_stages_summary_is_the_runs_eval_results():
    sim = Sim()
    sim.step()
    for stage in STAGES[:-1]:
        sim.succeed(f"r-{stage}-1")
    table = {"mathvista": {"ptst-2": {"accuracy": 0.52, "n": 1000}}}
    sim.succeed("r-eval-1", {"stage": "eval", "attempt": 1, "benchmarks": table, "artifactUri": "s3://x/eval/results"})
    assert sim.status.eval == {"benchmarks": table, "artifactUri": "s3://x/eval/results"}


def test_a_failed_eval_stage_keeps_the_scores_of_the_benchmarks_it_scored():
    sim = Sim()
    sim.step()
    for stage in STAGES[:-1]:
        sim.succeed(f"r-{stage}-1")
    table = {"mathvista": {"ptst-2": {"accuracy": 0.52, "n": 1000}},
             "mmmath": {"ptst-2": {"error": "DataSourceError: split 'test' matches no file", "n": 0}}}
    sim.set_job("r-eval-1", "Failed", reason="PodFailurePolicy",
                message="Container trainer for pod default/x failed with exit code 2 matching FailJob rule at index 0",
                finished_at="2026-01-01T00:00:00Z")
    sim.reports["r-eval-1"] = PodReport(
        summary={"stage": "eval", "attempt": 1, "benchmarks": table, "error": "benchmark(s) mmmath failed"},
        failure="pod x exited with code 2")
    sim.step()
    assert sim.record("eval").state == "Failed" and sim.status.phase == "Failed"
    assert sim.status.eval == {"benchmarks": table}


def test_the_next_stage_reads_the_artifact_uri_of_the_one_before():
    sim = Sim()
    sim.step()
    sim.succeed("r-bridge-1")
    d = sim.succeed("r-sft-1")
    assert d.start.plan.config.init_uri == sim.record("sft").artifact_uri
    assert sim.record("bridge").artifact_uri == "s3://vr1/runs/default/r/bridge"


def test_a_failed_attempt_is_retried_after_a_backoff_then_the_run_fails():
    sim = Sim()
    sim.step()
    d = sim.fail("r-bridge-1")
    assert d.start is None and d.requeue_after == pytest.approx(10)
    bridge = sim.record("bridge")
    assert bridge.state == "Running" and "starts at 2026-01-01T00:00:10Z" in bridge.message
    assert "RuntimeError: boom" in bridge.message
    assert sim.condition("Ready").reason == "RetryBackoff"
    sim.now += timedelta(seconds=10)
    d = sim.step()
    assert (d.start.plan.name, d.start.attempt) == ("bridge", 2)
    assert json_attempt(d) == 2  # the retry's config carries its attempt number
    assert (sim.record("bridge").attempts, sim.record("bridge").failures) == (2, 1)
    assert [e.reason for e in d.events] == ["StageRetrying"]
    d = sim.fail("r-bridge-2")  # backoffLimit 1: one retry, then the stage fails
    assert d.finished and d.start is None
    bridge = sim.record("bridge")
    assert (bridge.state, bridge.failures) == ("Failed", 2)
    assert sim.status.phase == "Failed" and sim.status.current_stage == "bridge"
    failed = sim.condition("Failed")
    assert failed.status == "True" and failed.reason == "StageFailed"
    assert "stage bridge" in failed.message and "RuntimeError: boom" in failed.message
    assert [e.reason for e in d.events] == ["StageFailed"] and "bridge" in d.events[0].message
    # A failed run is a record: nothing acts on it any more.
    assert sim.step().start is None


def json_attempt(d: Decision) -> int:
    return d.start.plan.for_attempt(d.start.attempt).config_json()["attempt"]


def test_backoff_doubles_up_to_the_maximum():
    from visionr1_operator.cluster.reconcile import retry_delay

    assert [retry_delay(n, SETTINGS) for n in (1, 2, 3, 6, 10)] == [10, 20, 40, 300, 300]


def test_an_unusable_config_fails_at_once():
    sim = Sim()
    sim.step()
    d = sim.fail("r-bridge-1", reason="PodFailurePolicy",
                 message="Container trainer for pod default/r-bridge-1-x failed with exit code 2 matching FailJob rule at index 0")
    assert d.finished and sim.record("bridge").state == "Failed"
    assert "could not use its config" in sim.record("bridge").message


def test_a_disruption_restarts_at_once_without_counting():
    sim = Sim()
    sim.step()
    d = sim.fail("r-bridge-1", reason="PodFailurePolicy",
                 message="Pod default/r-bridge-1-x has condition DisruptionTarget matching FailJob rule at index 1")
    assert (d.start.attempt, sim.record("bridge").failures) == (2, 0)
    assert "disrupted" in sim.record("bridge").message


def test_suspend_and_resume():
    sim = Sim()
    sim.step()
    sim.set_job("r-bridge-1", "Running")
    sim.edit(lambda spec: spec.update(suspend=True))
    d = sim.step()
    assert d.suspend_jobs == {"r-bridge-1": True}
    assert sim.status.phase == "Suspended" and sim.condition("Suspended").status == "True"
    assert sim.condition("Ready").reason == "Suspended"
    assert [e.reason for e in d.events] == ["Suspended"]
    assert sim.step().suspend_jobs == {}  # already suspended: nothing more to do
    # A stage that finishes while suspended does not start the next one.
    d = sim.succeed("r-bridge-1")
    assert d.start is None and sim.status.phase == "Suspended"
    sim.edit(lambda spec: spec.update(suspend=False))
    d = sim.step()
    assert d.start.plan.name == "sft" and sim.status.phase == "Pending"
    assert sim.condition("Suspended").status == "False" and [e.reason for e in d.events] == ["Resumed"]
    sim.set_job("r-sft-1", "Running")
    sim.step()
    assert sim.status.phase == "Running"


def test_resume_unsuspends_the_running_job():
    sim = Sim()
    sim.step()
    sim.set_job("r-bridge-1", "Running")
    sim.edit(lambda spec: spec.update(suspend=True))
    sim.step()
    sim.edit(lambda spec: spec.update(suspend=False))
    d = sim.step()
    assert d.suspend_jobs == {"r-bridge-1": False} and sim.record("bridge").state == "Running"


def test_with_a_queue_jobs_are_created_suspended_and_kueue_preemption_is_no_failure():
    sim = Sim(manifest(queueName="gpu-research"))
    d = sim.step()
    assert d.start.suspend is True
    assert sim.status.phase == "Pending" and sim.record("bridge").state == "Pending"
    ready = sim.condition("Ready")
    assert (ready.status, ready.reason) == ("False", "Queued") and "gpu-research" in ready.message
    sim.set_job("r-bridge-1", "Running")  # Kueue admitted it
    assert sim.step().suspend_jobs == {} and sim.status.phase == "Running"
    sim.set_job("r-bridge-1", "Suspended")  # Kueue preempted it
    d = sim.step()
    assert d.suspend_jobs == {} and d.start is None  # Kueue re-admits it, not the operator
    assert sim.status.phase == "Pending" and sim.condition("Failed").status == "False"
    sim.set_job("r-bridge-1", "Running")
    d = sim.succeed("r-bridge-1")
    assert d.start.suspend is True and d.start.plan.name == "sft"


def test_a_change_to_a_finished_stage_is_refused_until_reverted():
    sim = Sim()
    sim.step()
    sim.succeed("r-bridge-1")
    original = copy.deepcopy(sim.doc)
    sim.edit(lambda spec: spec["stages"]["bridge"].update(sampleLimit=10))
    d = sim.step()
    invalid = sim.condition("InvalidSpec")
    assert (invalid.status, invalid.reason) == ("True", "FinishedStageChanged") and "bridge" in invalid.message
    assert sim.condition("Ready").reason == "FinishedStageChanged"
    assert [e.reason for e in d.events] == ["SpecChangeRefused"]
    # The running stage still finishes and is recorded, but nothing new starts.
    d = sim.succeed("r-sft-1")
    assert d.start is None and sim.record("sft").state == "Succeeded"
    sim.doc, sim.generation = original, sim.generation + 1
    d = sim.step()
    assert d.start.plan.name == "ptst-1" and sim.condition("InvalidSpec").status == "False"


def test_removing_a_finished_stage_is_refused():
    sim = Sim()
    sim.step()
    sim.succeed("r-bridge-1")
    sim.edit(lambda spec: (spec["stages"]["bridge"].update(enabled=False),
                           spec["data"].pop("bridgeSource"),
                           spec["data"].update(coldStart={"source": "Osilly/Vision-R1-cold"})))
    sim.step()
    assert sim.condition("InvalidSpec").status == "True"
    assert "bridge has finished" in sim.condition("InvalidSpec").message


def test_changes_to_future_stages_apply():
    sim = Sim()
    sim.step()
    sim.succeed("r-bridge-1")
    sim.edit(lambda spec: spec["stages"]["ptst"][1].update(steps=42))
    sim.edit(lambda spec: spec["stages"]["eval"].update(enabled=False))
    sim.step()
    assert sim.condition("InvalidSpec").status == "False"
    assert [r.name for r in sim.status.stages] == ["bridge", "sft", "ptst-1", "ptst-2"]
    sim.succeed("r-sft-1")
    d = sim.succeed("r-ptst-1-1")
    assert d.start.plan.name == "ptst-2" and d.start.plan.config.ptst.steps == 42
    d = sim.succeed("r-ptst-2-1")
    assert d.finished and sim.status.phase == "Succeeded"


def test_an_invalid_spec_starts_nothing():
    doc = manifest()
    doc["spec"]["stages"]["ptst"][1]["maxCompletionLength"] = 32  # PTST lengths never decrease
    sim = Sim(doc)
    d = sim.step()
    assert d.start is None and sim.status.phase == "Pending"
    invalid = sim.condition("InvalidSpec")
    assert (invalid.status, invalid.reason) == ("True", "SpecInvalid")
    assert "spec.stages.ptst[1].maxCompletionLength" in invalid.message
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    assert sim.step().events == []  # said once


def test_a_lost_status_is_rebuilt_from_the_jobs():
    sim = Sim()
    sim.jobs = {
        "r-bridge-1": JobView("r-bridge-1", "bridge", 1, "u1", "Succeeded", finished_at="2026-01-01T00:00:00Z"),
        "r-sft-1": JobView("r-sft-1", "sft", 1, "u1", "Failed", reason="BackoffLimitExceeded"),
        "r-sft-2": JobView("r-sft-2", "sft", 2, "u1", "Running"),
    }
    d = sim.step()
    assert d.start is None  # every Job it needs exists: no duplicate
    bridge, sft = sim.record("bridge"), sim.record("sft")
    assert (bridge.state, bridge.attempts) == ("Succeeded", 1)
    assert (sft.state, sft.attempts, sft.job_name) == ("Running", 2, "r-sft-2")


def test_a_job_that_disappeared_is_created_again_under_the_same_name():
    sim = Sim()
    sim.step()
    del sim.jobs["r-bridge-1"]
    d = sim.step()
    assert (d.start.job_name, d.start.attempt) == ("r-bridge-1", 1)


def test_progress_of_the_running_stage_goes_into_status():
    sim = Sim()
    sim.step()
    progress = Progress(stage="bridge", step=5, total_steps=10, reward=0.25, completion_length=120.5,
                        updated_at="2026-01-01T00:00:00Z")
    sim.step(progress=progress)
    assert sim.status.progress == progress
    sim.step(progress=Progress(stage="sft", step=1))  # not the current stage: ignored
    assert sim.status.progress == progress


def test_status_merge_patch():
    old = {"phase": "Running", "progress": {"stage": "sft", "step": 3, "reward": 0.5}, "stages": [1, 2]}
    new = {"phase": "Running", "progress": {"stage": "ptst-1"}, "stages": [1, 2, 3], "currentStage": "ptst-1"}
    assert merge_patch(old, new) == {
        "progress": {"stage": "ptst-1", "step": None, "reward": None}, "stages": [1, 2, 3], "currentStage": "ptst-1"}
    assert merge_patch(new, new) == {}
    sim = Sim()
    before = status_document(sim.status)
    sim.step()
    assert merge_patch(before, status_document(sim.status))["currentStage"] == "bridge"


def test_a_queued_run_is_suspended_through_its_kueue_workload_never_its_job():
    """Issue 14, finding 2: under a queueName Kueue owns the Job's spec.suspend (it starts any
    suspended Job whose Workload is still admitted), so the operator deactivates the Workload."""
    sim = Sim(manifest(queueName="gpu-research"))
    sim.step()
    sim.set_job("r-bridge-1", "Running")  # admitted by Kueue
    d = sim.step()
    assert d.workload_active == {"r-bridge-1": True} and d.suspend_jobs == {}
    sim.edit(lambda spec: spec.update(suspend=True))
    d = sim.step()
    assert d.workload_active == {"r-bridge-1": False} and d.suspend_jobs == {}
    assert sim.status.phase == "Suspended" and sim.record("bridge").state == "Pending"
    sim.set_job("r-bridge-1", "Suspended")  # Kueue evicted the deactivated Workload
    d = sim.step()
    assert d.workload_active == {"r-bridge-1": False} and d.suspend_jobs == {}
    sim.edit(lambda spec: spec.update(suspend=False))
    d = sim.step()
    assert d.workload_active == {"r-bridge-1": True} and d.suspend_jobs == {}  # Kueue unsuspends it
    assert sim.record("bridge").failures == 0 and sim.record("bridge").attempts == 1
