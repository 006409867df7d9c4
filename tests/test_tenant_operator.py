"""A hostile tenant against the operator, without a cluster: its run's schema, and the
progress scrape of a pod whose image the tenant chose (issue: multi-tenant safety).
The deep-affinity attack on a running operator is in test_cluster_safety.py."""

from __future__ import annotations

import resource
import sys
from datetime import datetime, timezone

import pytest
from aiohttp import web
from operator_harness import run_manifest

from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifest import ManifestError, validate_document
from visionr1_operator.cluster.progress import MAX_PAGE_BYTES, Scraper, keep_series, parse_progress

PAGE = (
    "# HELP visionr1_step Last step.\n# TYPE visionr1_step gauge\n"
    'visionr1_step{run="r",stage="ptst-1"} 7\n'
    'visionr1_total_steps{run="r",stage="ptst-1"} 50\n'
    'other_series{run="r"} 1\n'
)


def _nested(depth: int) -> dict:
    inner: dict = {}
    for _ in range(depth):
        inner = {"x": inner}
    return inner


def test_a_deep_affinity_is_refused_naming_the_field():
    doc = run_manifest("hostile")
    doc["spec"]["stages"]["sft"]["resources"] = {"affinity": {"nodeAffinity": _nested(50)}}
    with pytest.raises(ManifestError) as err:
        validate_document(doc, "hostile.yaml")
    assert any(path.startswith("spec.stages.sft.resources.affinity.nodeAffinity") for path, _ in err.value.problems)


def test_a_real_affinity_still_reaches_the_pods():
    affinity = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"visionr1.io/stage": "sft"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    doc = run_manifest("placed")
    doc["spec"]["stages"]["sft"]["resources"] = {"affinity": affinity}
    run = VisionR1Run.model_validate(doc, by_alias=True, by_name=False)
    from visionr1_operator.cluster.jobs import build_job
    from visionr1_operator.cluster.naming import Owner
    from visionr1_operator.plan import build_plan

    plan = next(p for p in build_plan(run) if p.name == "sft")
    pod = build_job(Owner("placed", "default", "u"), run.spec, plan, 1, suspend=False)["spec"]["template"]["spec"]
    assert pod["affinity"] == affinity


def test_label_keys_and_selector_sizes_are_bounded():
    doc = run_manifest("wide")
    doc["spec"]["stages"]["sft"]["resources"] = {"nodeSelector": {f"k{i}": "v" for i in range(65)}}
    with pytest.raises(ManifestError):
        validate_document(doc, "wide.yaml")


def test_keep_series_drops_everything_progress_does_not_read():
    kept = keep_series([line.encode() for line in PAGE.splitlines()])
    assert b'other_series{run="r"} 1' not in kept
    assert len(kept) == 4


async def _serve(routes) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.asyncio
async def test_a_huge_page_is_dropped_without_being_buffered():
    sent = {"bytes": 0}

    async def huge(request):
        response = web.StreamResponse()
        await response.prepare(request)
        line = b'visionr1_step{run="r",stage="ptst-1"} 7\n' * 1600  # ~64 KiB of matching lines
        try:
            for _ in range(1600):  # 100 MiB, streamed: the operator must stop reading early
                await response.write(line)
                sent["bytes"] += len(line)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    runner, base = await _serve([web.get("/metrics", huge)])
    scraper = Scraper(timeout_seconds=30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        assert await scraper.fetch(f"{base}/metrics") is None
    finally:
        await scraper.close()
        await runner.cleanup()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024, f"peak RSS grew {grown_kib} KiB reading the page"
    assert sent["bytes"] < 100 * MAX_PAGE_BYTES


@pytest.mark.asyncio
async def test_a_redirect_is_never_followed():
    hits = {"elsewhere": 0}

    async def elsewhere(request):
        hits["elsewhere"] += 1
        return web.Response(text=PAGE)

    other, other_base = await _serve([web.get("/metrics", elsewhere)])

    async def redirect(request):
        raise web.HTTPFound(f"{other_base}/metrics")

    runner, base = await _serve([web.get("/metrics", redirect)])
    scraper = Scraper()
    try:
        assert await scraper.fetch(f"{base}/metrics") is None
    finally:
        await scraper.close()
        await runner.cleanup()
        await other.cleanup()
    assert hits["elsewhere"] == 0


@pytest.mark.asyncio
async def test_an_ordinary_page_still_gives_progress():
    async def page(request):
        return web.Response(text=PAGE)

    runner, base = await _serve([web.get("/metrics", page)])
    scraper = Scraper()
    try:
        text = await scraper.fetch(f"{base}/metrics")
    finally:
        await scraper.close()
        await runner.cleanup()
    progress = parse_progress(text, "r", "ptst-1", datetime.now(timezone.utc))
    assert progress.step == 7 and progress.total_steps == 50
    assert sys.getsizeof(text) < 1024


# --- the admin's policy: ServiceAccounts, priority classes, images ----------------------


def _plans(**resources):
    from visionr1_operator.plan import build_plan

    doc = run_manifest("policy-check")
    for stage in ("sft", "grpo"):
        doc["spec"]["stages"][stage]["resources"] = dict(resources)
    return build_plan(VisionR1Run.model_validate(doc, by_alias=True, by_name=False))


def test_an_empty_policy_allows_anything():
    from visionr1_operator.cluster.admission import Policy, policy_problems

    assert policy_problems(_plans(serviceAccountName="admin", priorityClassName="system-node-critical"),
                           Policy()) == []


def test_the_policy_refuses_what_it_does_not_list_naming_the_field():
    from visionr1_operator.cluster.admission import Policy, policy_problems

    policy = Policy(service_accounts=("default",), priority_classes=("research-low",),
                    image_prefixes=("registry.example.com/",))
    problems = dict(policy_problems(_plans(serviceAccountName="cluster-admin-ish",
                                           priorityClassName="system-node-critical", image="evil.io/miner:1"),
                                    policy))
    assert "cluster-admin-ish" in problems["stages.sft.resources.serviceAccountName"]
    assert "system-node-critical" in problems["stages.sft.resources.priorityClassName"]
    assert "evil.io/miner:1" in problems["stages.sft.resources.image"]
    # Both PTST stages run with stages.grpo's resources: named once.
    assert "stages.grpo.resources.image" in problems and not any("ptst" in p for p in problems)
    allowed = policy_problems(_plans(priorityClassName="research-low"), policy)
    assert allowed == []


def test_the_operator_flags_build_the_policy():
    from visionr1_operator.cluster.__main__ import operator_config, parse_args

    config = operator_config(parse_args(["--allow-service-account=default", "--allow-service-account=trainer",
                                         "--allow-image-prefix=registry.example.com/ml/"]))
    assert config.policy.service_accounts == ("default", "trainer")
    assert config.policy.image_prefixes == ("registry.example.com/ml/",)


def test_a_stage_config_too_big_for_its_configmap_is_refused_before_any_create(monkeypatch):
    from visionr1_operator.cluster import admission

    plans = _plans()
    assert admission.size_problems(plans) == []  # an ordinary run is far below the limit
    monkeypatch.setattr(admission, "MAX_CONFIG_BYTES", 100)
    problems = dict(admission.admission_problems(plans, admission.Policy()))
    assert "more than the 100 a ConfigMap holds" in problems["stages.sft"]
    assert "stages.grpo" in problems and "stages.ptst-1" not in problems


def test_a_pods_termination_message_is_masked_before_it_reaches_the_status(monkeypatch):
    """A trainer image the tenant chose may write anything; the operator masks what it copies."""
    from visionr1_operator.cluster.naming import CONTAINER
    from visionr1_operator.cluster.observe import pod_report

    monkeypatch.setenv("HF_TOKEN", "planted-hub-token-0f0f")
    message = '{"error": "GET https://user:pw@hub.example/x failed with planted-hub-token-0f0f"}'
    pod = {"metadata": {}, "status": {"containerStatuses": [{"name": CONTAINER, "state": {
        "terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]}}
    report = pod_report([pod])
    text = f"{report.summary} {report.failure}"
    assert "planted-hub-token-0f0f" not in text and "user:pw" not in text


# --- settings that cannot split over the stage's ranks are refused before any pod ------------


def test_a_rollout_batch_that_does_not_split_over_the_ranks_is_refused_naming_the_field():
    doc = run_manifest("uneven")
    doc["spec"]["stages"]["grpo"].update(
        {"rolloutBatchSize": 12, "resources": {"nodes": 2, "gpusPerNode": 8}})  # 16 ranks
    with pytest.raises(ManifestError) as err:
        validate_document(doc, "uneven.yaml")
    assert any(path == "spec.stages.grpo.rolloutBatchSize" and "16 ranks" in message
               for path, message in err.value.problems), err.value.problems
    doc["spec"]["stages"]["grpo"]["rolloutBatchSize"] = 32
    validate_document(doc, "even.yaml")


def test_a_finished_runs_edit_is_acknowledged_and_nothing_else_changes():
    from visionr1_operator.cluster.status import finished_generation_patch

    conditions = [{"type": "Succeeded", "status": "True", "reason": "AllStagesSucceeded", "observedGeneration": 1}]
    body = {"metadata": {"generation": 2}, "status": {"phase": "Succeeded", "observedGeneration": 1,
                                                     "conditions": conditions}}
    assert finished_generation_patch(body) == {
        "observedGeneration": 2, "conditions": [{**conditions[0], "observedGeneration": 2}]}
    body["metadata"]["generation"] = 1
    assert finished_generation_patch(body) is None  # already current
    running = {"metadata": {"generation": 3}, "status": {"phase": "Running", "observedGeneration": 1}}
    assert finished_generation_patch(running) is None  # the run's controller does it
