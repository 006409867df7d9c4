"""The operator under kopf, unmodified, against a Kubernetes API served over HTTP in the test.

The emulator runs no controllers: the tests play the Job controller and the kubelet
(``JobPlayer``), Kueue (suspending and unsuspending Jobs) and the garbage collector.
Every object the operator creates is checked against the Kubernetes 1.33 schemas, and
the run (status included) against the generated CRD.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

import kubernetes_validate
import pytest
import pytest_asyncio
from crd_harness import structural_errors
from operator_harness import RUNS, Api, JobPlayer, cluster_api, run_manifest, running_operator
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from visionr1_operator.cluster.controller import parse_run
from visionr1_operator.cluster.jobs import build_config_map
from visionr1_operator.cluster.naming import Owner
from visionr1_operator.cluster.metrics import OperatorMetrics
from visionr1_operator.plan import build_plan

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
STAGES = ["bridge", "sft", "ptst-1", "ptst-2", "eval"]


@pytest_asyncio.fixture
async def api():
    async with cluster_api() as api:
        yield api


KINDS = {"jobs": ("batch/v1", "Job"), "configmaps": ("v1", "ConfigMap"), "services": ("v1", "Service"),
         "events": ("v1", "Event")}


def created_by_operator(api: Api) -> list[dict]:
    """The objects the operator (and kopf, for Events) POSTed, as the API server types them."""
    out = []
    for request in api.writes():
        if request.method.value == "POST":
            api_version, kind = KINDS[request.resource.plural]
            # kopf posts Events without apiVersion/kind: the server takes them from the URL.
            out.append({"apiVersion": api_version, "kind": kind, **request.data})
    return out


def check_everything_valid(api: Api, run: str, namespace: str = "default") -> None:
    """Every object the operator created passes the Kubernetes schemas; the run, its CRD."""
    created = created_by_operator(api)
    assert created
    for obj in created:
        kubernetes_validate.validate(obj, "1.33", strict=True)
    assert structural_errors(api.run(run, namespace)) == []


def condition(run: dict, type_: str) -> dict:
    return next(c for c in run["status"]["conditions"] if c["type"] == type_)


def stage_state(api: Api, run: str, index: int) -> str | None:
    """The state of a run's stage record, None while the operator has not written it."""
    stages = api.status(run).get("stages") or []
    return stages[index]["state"] if index < len(stages) else None


def events(api: Api, reason: str) -> list[dict]:
    return [e for e in api.objects("v1/events") if e.get("reason") == reason]


async def test_a_run_goes_through_every_stage_to_succeeded(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r1"))
        writes_per_transition = []
        for i, stage in enumerate(STAGES):
            job = f"r1-{stage}-1"
            await player.start(job)
            await api.wait_for(lambda: api.status("r1").get("currentStage") == stage, what=stage)
            since = len(api.requests())
            await player.succeed(job, {"stage": stage, "step": 3, "reward": 0.5, "accuracy": 0.4})
            if i + 1 < len(STAGES):
                await api.wait_job(f"r1-{STAGES[i + 1]}-1")
                await api.wait_for(lambda: api.status("r1").get("currentStage") == STAGES[i + 1])
                writes_per_transition.append(len(api.writes(since)))
        run = await api.wait_phase("r1", "Succeeded")
    # Transition: the status patch, the ConfigMap, the Job; never more than 4 writes.
    assert writes_per_transition and max(writes_per_transition) <= 4, writes_per_transition
    status = run["status"]
    assert [s["name"] for s in status["stages"]] == STAGES
    assert all(s["state"] == "Succeeded" and s["attempts"] == 1 for s in status["stages"])
    # The trainer's termination message (its exit summary) is in each stage's record.
    assert status["stages"][2]["summary"] == {"stage": "ptst-1", "step": 3, "reward": 0.5, "accuracy": 0.4}
    assert status["stages"][1]["artifactUri"] == "s3://vr1/runs/default/r1/sft"
    # `kubectl wait --for=condition=Succeeded` reads this:
    assert condition(run, "Succeeded")["status"] == "True" and condition(run, "Ready")["status"] == "True"
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert sorted(api.job_names()) == sorted(f"r1-{s}-1" for s in STAGES)  # one Job per stage, no duplicate
    # Each stage's config reads the artifact its predecessor committed.
    ptst1 = json.loads(api.get("v1/configmaps", "default", "r1-ptst-1-1")["data"]["stage.json"])
    assert ptst1["initUri"] == status["stages"][1]["artifactUri"]
    for job in api.jobs():
        assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    assert events(api, "Succeeded")
    check_everything_valid(api, "r1")


async def test_a_multi_node_stage_gets_an_indexed_job_and_a_headless_service(api):
    doc = run_manifest("r1m")
    doc["spec"]["stages"]["grpo"]["resources"] = {"nodes": 2, "gpusPerNode": 8}
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, doc)
        await player.succeed("r1m-bridge-1")
        await api.wait_job("r1m-sft-1")
        await api.wait_for(lambda: api.status("r1m").get("currentStage") == "sft")
        since = len(api.requests())
        await player.succeed("r1m-sft-1")
        job = await api.wait_job("r1m-ptst-1-1")
        await api.wait_for(lambda: api.status("r1m").get("currentStage") == "ptst-1")
        writes = api.writes(since)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    service = api.get("v1/services", "default", "r1m-ptst-1-1")
    assert service["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == "r1m-ptst-1-1"
    # Into a multi-node stage: the status, the ConfigMap, the Service and the Job.
    assert sorted(f"{r.method.value} {r.resource.plural}" for r in writes) == [
        "PATCH visionr1runs", "POST configmaps", "POST jobs", "POST services"]
    check_everything_valid(api, "r1m")


async def test_a_failing_stage_is_retried_then_the_run_fails(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r2"))
        await player.fail("r2-bridge-1", error="ValueError: no rows")
        # backoffLimit 1: one more attempt, after the backoff, resuming from its checkpoint.
        await api.wait_job("r2-bridge-2")
        config = json.loads(api.get("v1/configmaps", "default", "r2-bridge-2")["data"]["stage.json"])
        assert config["attempt"] == 2
        await player.fail("r2-bridge-2", error="ValueError: still no rows")
        run = await api.wait_phase("r2", "Failed")
        await api.wait_for(lambda: events(api, "StageFailed"), what="the StageFailed event")
    failed = condition(run, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed"
    assert "stage bridge" in failed["message"] and "ValueError: still no rows" in failed["message"]
    bridge = run["status"]["stages"][0]
    assert (bridge["state"], bridge["attempts"], bridge["failures"]) == ("Failed", 2, 2)
    assert sorted(api.job_names()) == ["r2-bridge-1", "r2-bridge-2"]
    (event,) = events(api, "StageFailed")
    assert event["type"] == "Warning" and "bridge" in event["message"]
    assert events(api, "StageRetrying")
    check_everything_valid(api, "r2")


async def test_suspend_and_resume(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r3"))
        await player.start("r3-bridge-1")
        await api.patch(RUNS, "default", "r3", {"spec": {"suspend": True}})
        await api.wait_for(lambda: api.get("batch/v1/jobs", "default", "r3-bridge-1")["spec"]["suspend"] is True,
                           what="the Job suspended")
        run = await api.wait_phase("r3", "Suspended")
        assert condition(run, "Suspended")["status"] == "True"
        # A stage finishing while the run is suspended does not start the next one.
        await player.succeed("r3-bridge-1")
        await api.wait_for(lambda: stage_state(api, "r3", 0) == "Succeeded")
        await asyncio.sleep(0.3)
        assert sorted(api.job_names()) == ["r3-bridge-1"]
        await api.patch(RUNS, "default", "r3", {"spec": {"suspend": False}})
        await api.wait_job("r3-sft-1")
        await player.start("r3-sft-1")
        run = await api.wait_phase("r3", "Running")
    assert condition(run, "Suspended")["status"] == "False"
    assert events(api, "Suspended") and events(api, "Resumed")
    check_everything_valid(api, "r3")


async def test_resume_unsuspends_the_running_job(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r3b"))
        await player.start("r3b-bridge-1")
        await api.patch(RUNS, "default", "r3b", {"spec": {"suspend": True}})
        await api.wait_phase("r3b", "Suspended")
        await api.patch(RUNS, "default", "r3b", {"spec": {"suspend": False}})
        await api.wait_for(lambda: api.get("batch/v1/jobs", "default", "r3b-bridge-1")["spec"]["suspend"] is False,
                           what="the Job resumed")


async def test_queue_name_jobs_wait_for_kueue_and_preemption_is_no_failure(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r4", queueName="gpu-research"))
        job = await api.wait_job("r4-bridge-1")
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-research"
        run = await api.wait_phase("r4", "Pending")
        assert condition(run, "Ready")["reason"] == "Queued"
        await player.suspend_by_queue("r4-bridge-1", False)  # admitted
        await api.wait_phase("r4", "Running")
        await player.suspend_by_queue("r4-bridge-1", True)  # preempted
        run = await api.wait_phase("r4", "Pending")
        assert condition(run, "Failed")["status"] == "False"
        await asyncio.sleep(0.2)
        assert api.get("batch/v1/jobs", "default", "r4-bridge-1")["spec"]["suspend"] is True  # Kueue's call
        await player.suspend_by_queue("r4-bridge-1", False)  # admitted again
        await player.succeed("r4-bridge-1")
        sft = await api.wait_job("r4-sft-1")
        assert sft["spec"]["suspend"] is True
    assert sorted(api.job_names()) == ["r4-bridge-1", "r4-sft-1"]
    check_everything_valid(api, "r4")


async def test_a_restarted_operator_continues_without_duplicates(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r5"))
        await player.succeed("r5-bridge-1")
        await api.wait_job("r5-sft-1")
        await player.start("r5-sft-1")
    # Down: sft finishes, and the next stage's ConfigMap even exists (as if the operator had
    # crashed between creating it and its Job): the new operator's create gets a 409 and adopts it.
    await player.succeed("r5-sft-1")
    run = api.run("r5")
    assert run["status"]["currentStage"] == "sft"
    model = parse_run(run)[0]
    plan = next(p for p in build_plan(model, "visionr1/trainer:test") if p.name == "ptst-1")
    await api.create("v1/configmaps", build_config_map(Owner("r5", "default", run["metadata"]["uid"]), plan, 1))
    async with running_operator(api):
        await api.wait_for(lambda: api.status("r5").get("currentStage") == "ptst-1", what="ptst-1")
        await api.wait_job("r5-ptst-1-1")
        await player.succeed("r5-ptst-1-1")
        await api.wait_job("r5-ptst-2-1")
    async with running_operator(api):  # and once more, mid-stage, with nothing to do
        await asyncio.sleep(0.3)
        await player.succeed("r5-ptst-2-1")
        await api.wait_job("r5-eval-1")
    assert sorted(api.job_names()) == sorted(f"r5-{s}-1" for s in STAGES)  # no duplicate
    posts = [r for r in api.writes() if r.method.value == "POST" and r.data.get("kind") in ("Job", "ConfigMap")]
    assert sorted(r.data["metadata"]["name"] for r in posts if r.data["kind"] == "Job") == sorted(
        f"r5-{s}-1" for s in STAGES)  # each Job POSTed once
    adopted = [r for r in posts if r.data["metadata"]["name"] == "r5-ptst-1-1" and r.data["kind"] == "ConfigMap"]
    assert len(adopted) == 1 and len(api.objects("v1/configmaps")) == len(STAGES)
    check_everything_valid(api, "r5")


async def test_an_existing_job_is_adopted_not_duplicated(api):
    """A 409 on create: the Job exists (a status write was lost); the operator adopts it."""
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r5b"))
        await player.start("r5b-bridge-1")
        await api.wait_for(lambda: stage_state(api, "r5b", 0) == "Running")
    # Forget the status, as if the operator had crashed before writing it.
    await api.patch(RUNS, "default", "r5b", {"status": None}, "status")
    async with running_operator(api):
        await api.wait_for(lambda: api.run("r5b").get("status", {}).get("currentStage") == "bridge")
        await player.succeed("r5b-bridge-1")
        await api.wait_job("r5b-sft-1")
    assert sorted(api.job_names()) == ["r5b-bridge-1", "r5b-sft-1"]
    assert api.status("r5b")["stages"][0]["state"] == "Succeeded"


async def test_deleting_a_run_stops_it_and_its_objects_are_collected(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r6"))
        await player.start("r6-bridge-1")
        run = await api.wait_for(lambda: (r := api.run("r6")).get("metadata", {}).get("finalizers") and r)
        await api.delete(RUNS, "default", "r6")
        await api.wait_for(lambda: api.get(RUNS, "default", "r6") is None, what="the run gone")
        deleted = await api.collect_garbage()  # the owner references make them garbage
        assert sorted(deleted) == ["ConfigMap/r6-bridge-1", "Job/r6-bridge-1"]
        await asyncio.sleep(0.3)
        assert api.jobs() == [] and api.objects("v1/configmaps") == []  # nothing re-created
    assert run["metadata"]["finalizers"] == ["visionr1.io/finalizer"]


async def test_an_invalid_spec_gets_a_condition_and_an_event_and_no_job(api):
    doc = run_manifest("r7")
    doc["spec"]["stages"]["ptst"][1]["maxCompletionLength"] = 32  # lengths never decrease
    async with running_operator(api):
        await api.create(RUNS, doc)  # the emulator does not run the CRD's CEL rules
        run = await api.wait_for(lambda: (r := api.run("r7")).get("status") and r)
        await api.wait_for(lambda: events(api, "InvalidSpec"), what="the InvalidSpec event")
        invalid = condition(run, "InvalidSpec")
        assert invalid["status"] == "True" and "spec.stages.ptst[1].maxCompletionLength" in invalid["message"]
        assert api.jobs() == []
        # Fixing the spec starts the run.
        await api.patch(RUNS, "default", "r7", {"spec": {"stages": {"ptst": run_manifest("r7")["spec"]["stages"]["ptst"]}}})
        await api.wait_job("r7-bridge-1")
    assert condition(api.run("r7"), "InvalidSpec")["status"] == "False"


async def test_spec_changes_mid_run(api):
    player = JobPlayer(api)
    async with running_operator(api):
        await api.create(RUNS, run_manifest("r8"))
        await player.succeed("r8-bridge-1")
        await api.wait_job("r8-sft-1")
        # A future stage: applies.
        ptst = run_manifest("r8")["spec"]["stages"]["ptst"]
        ptst[1]["steps"] = 42
        await api.patch(RUNS, "default", "r8", {"spec": {"stages": {"ptst": ptst}}})
        # A finished stage: refused with a condition, and nothing new starts.
        await api.patch(RUNS, "default", "r8", {"spec": {"stages": {"bridge": {"sampleLimit": 5}}}})
        run = await api.wait_for(lambda: (r := api.run("r8")) and condition(r, "InvalidSpec")["status"] == "True" and r)
        assert condition(run, "InvalidSpec")["reason"] == "FinishedStageChanged"
        await api.wait_for(lambda: events(api, "SpecChangeRefused"), what="the SpecChangeRefused event")
        await player.succeed("r8-sft-1")
        await api.wait_for(lambda: stage_state(api, "r8", 1) == "Succeeded")
        await asyncio.sleep(0.3)
        assert "r8-ptst-1-1" not in api.job_names()
        # Reverted: the run goes on, with the future stage's change.
        await api.patch(RUNS, "default", "r8", {"spec": {"stages": {"bridge": {"sampleLimit": None}}}})
        await player.succeed("r8-ptst-1-1")
        await api.wait_job("r8-ptst-2-1")
    config = json.loads(api.get("v1/configmaps", "default", "r8-ptst-2-1")["data"]["stage.json"])
    assert config["ptst"]["steps"] == 42
    assert condition(api.run("r8"), "InvalidSpec")["status"] == "False"


async def test_progress_is_read_from_the_stage_pods_metrics(api):
    registry = CollectorRegistry()
    gauges = {name: Gauge(f"visionr1_{name}", name, ["run", "stage"], registry=registry)
              for name in ("step", "total_steps", "reward_mean", "completion_length_mean")}
    for name, value in (("step", 7), ("total_steps", 100), ("reward_mean", 0.625), ("completion_length_mean", 311.5)):
        gauges[name].labels(run="r9", stage="bridge").set(value)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    metrics = OperatorMetrics()
    health = f"http://127.0.0.1:{free_port()}/healthz"
    try:
        player = JobPlayer(api)
        async with running_operator(api, metrics=metrics, liveness_endpoint=health):
            await api.create(RUNS, run_manifest("r9"))
            await player.start("r9-bridge-1")
            await player.running_pod("r9-bridge-1", server.server_port)
            run = await api.wait_for(lambda: api.status("r9").get("progress", {}).get("step") == 7 and api.run("r9"),
                                     what="progress in status")
            gauges["step"].labels(run="r9", stage="bridge").set(8)
            await api.wait_for(lambda: api.status("r9").get("progress", {}).get("step") == 8, what="progress updated")
            # The liveness endpoint (kopf's), with the operator's own probe in it.
            async with aiohttp.ClientSession() as session, session.get(health) as response:
                assert response.status == 200 and (await response.json())["runs"] == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run["status"]["progress"] == {"stage": "bridge", "step": 7, "totalSteps": 100, "reward": 0.625,
                                         "completionLength": 311.5, "updatedAt": run["status"]["progress"]["updatedAt"]}
    # The operator's own metrics.
    text = metrics_text(metrics)
    assert 'visionr1_operator_runs{phase="Running"} 1.0' in text
    assert 'visionr1_operator_api_requests_total{resource="Job",verb="create"} 1.0' in text
    assert 'visionr1_operator_stage_transitions_total{kind="bridge",state="Running"} 1.0' in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics_text(metrics: OperatorMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
