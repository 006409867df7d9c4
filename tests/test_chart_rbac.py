"""The chart's RBAC grants exactly the API calls the operator makes: nothing missing, nothing more.

For each install mode (cluster-wide, watched namespaces, and HA in both), the operator
is started with the very flags the chart's Deployment gives it (parsed by its own
``parse_args``), against a Kubernetes API served over HTTP (``operator_harness``), and
taken through everything it does to a run: create a stage's ConfigMap, Service and Job,
adopt ones that already exist, suspend and resume a Job, read the stage pods' exit
summaries, write status and Events, and remove its finalizer when the run is deleted.
Every request it sends is turned into the RBAC (apiGroup, resource, verb) that
authorizes it; that set must equal what the rendered Roles grant.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
import pytest
from chart_harness import NAMESPACE, VALUE_SETS, of_kind, one, operator_args, render
from operator_harness import RUNS, Api, JobPlayer, cluster_api, run_manifest, running_operator

from visionr1_operator.cluster.__main__ import kopf_options, parse_args
from visionr1_operator.cluster.controller import parse_run
from visionr1_operator.cluster.jobs import build_config_map, build_stage_objects
from visionr1_operator.cluster.naming import Owner
from visionr1_operator.plan import build_plan

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

Rule = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
CLUSTER_SCOPED = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering", namespaced=False),
}
NAMESPACED = {"kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering", namespaced=True),
              # Kueue's Workloads: a queued run is suspended through its Job's Workload.
              "kueue.x-k8s.io/v1beta2/workloads": dict(kind="Workload", namespaced=True)}
WORKLOADS = "kueue.x-k8s.io/v1beta2/workloads"
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


def declare_cluster_extras(api: Api) -> None:
    """What a real cluster with this chart installed serves besides the harness's resources:
    the CRD API (kopf watches it) and kopf's peering resources (from the chart's crds/)."""
    for resource, info in {**CLUSTER_SCOPED, **NAMESPACED}.items():
        api.cluster.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)


def rbac_verb(request: kmock.Request) -> str:
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update"}[method]


def requested(api: Api) -> tuple[set[Rule], set[str | None]]:
    """The RBAC rules the operator's requests need, and the namespaces they went to."""
    rules, namespaces = set(), set()
    for request in api.requests():
        if not request.headers.get("User-Agent", "").startswith("kopf"):
            continue  # the test's own requests
        if request.resource is None or request.resource.plural is None:  # discovery: allowed to all authenticated
            assert request.method.value == "GET" and request.url.path.startswith(("/api", "/apis")), request.url
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        rules.add((request.resource.group, resource, rbac_verb(request)))
        namespaces.add(request.namespace)
    return rules, namespaces


def owner_finalizer_rules(api: Api) -> set[Rule]:
    """Creating an object whose ownerReference has blockOwnerDeletion needs ``update`` on the
    owner's ``finalizers`` subresource (the OwnerReferencesPermissionEnforcement admission
    plugin, on in OpenShift and many hardened clusters); no request shows it, the objects do."""
    plural = {info.kind: res for res, info in api.cluster.resources.items()}
    rules = set()
    for request in api.requests():
        if request.method.value == "POST" and isinstance(request.data, dict):
            for ref in request.data.get("metadata", {}).get("ownerReferences") or []:
                if ref.get("blockOwnerDeletion"):
                    res = plural[ref["kind"]]
                    rules.add((res.group, f"{res.plural}/finalizers", "update"))
    return rules


def granted(rules: list[dict[str, Any]]) -> set[Rule]:
    out = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


async def exercise(api: Api, options, namespace: str, peering: dict[str, Any] | None) -> None:
    """Everything the operator does to a run, in ``namespace``."""
    player = JobPlayer(api)
    if peering is not None:
        await api.create(f"kopf.dev/v1/{'kopfpeerings' if peering['kind'] == 'KopfPeering' else 'clusterkopfpeerings'}",
                         peering)
    doc = run_manifest("rb", namespace)
    doc["spec"]["stages"]["grpo"]["resources"] = {"nodes": 2, "gpusPerNode": 8}  # a Service per attempt
    doc["spec"]["stages"]["bridge"]["ttlSecondsAfterFinished"] = 0  # set on its Job once recorded (patch)
    await api.create(RUNS, doc)
    # ptst-1's objects exist already, as after an operator crash between creating them and
    # writing the status: the creates get a 409 and the operator reads (get) and adopts
    # them. The Job has no labels, so kopf's index of the run's Jobs does not show it (as
    # when the index lags behind a create): only the 409 tells the operator it exists.
    run = api.run("rb", namespace)
    model = parse_run(run)[0]
    plan = next(p for p in build_plan(model, "visionr1/trainer:test") if p.name == "ptst-1")
    owner = Owner("rb", namespace, run["metadata"]["uid"])
    for obj in build_stage_objects(owner, model.spec, plan, 1, suspend=False):
        if obj["kind"] == "Job":
            del obj["metadata"]["labels"]
        await api.create({"Job": "batch/v1/jobs", "ConfigMap": "v1/configmaps", "Service": "v1/services"}[obj["kind"]],
                         obj)
    # sft's ConfigMap was left by a crash from an older spec, its Job never created: the
    # operator checks for the Job (get) and runs the attempt as number 2.
    sft = next(p for p in build_plan(model, "visionr1/trainer:test") if p.name == "sft")
    stale = build_config_map(owner, sft, 1)
    stale["data"] = {"stage.json": "{}\n"}
    await api.create("v1/configmaps", stale)

    async with running_operator(api, options=options):
        await player.start("rb-bridge-1", namespace)
        await api.patch(RUNS, namespace, "rb", {"spec": {"suspend": True}})
        await api.wait_for(lambda: api.get("batch/v1/jobs", namespace, "rb-bridge-1")["spec"]["suspend"] is True,
                           what="the Job suspended")
        await api.patch(RUNS, namespace, "rb", {"spec": {"suspend": False}})
        await api.wait_for(lambda: api.get("batch/v1/jobs", namespace, "rb-bridge-1")["spec"]["suspend"] is False,
                           what="the Job resumed")
        await player.succeed("rb-bridge-1", {"stage": "bridge"}, namespace)
        await player.succeed("rb-sft-2", {"stage": "sft"}, namespace)
        await api.wait_for(lambda: api.status("rb", namespace).get("currentStage") == "ptst-1", what="ptst-1 adopted")
        await api.delete(RUNS, namespace, "rb")
        await api.wait_for(lambda: api.get(RUNS, namespace, "rb") is None, what="the run gone")
        # Its Jobs, deleted by the garbage collector, are released (get the run, get, patch);
        # all but ptst-1's, which has no labels here, so the operator's watch never shows it.
        await api.collect_garbage()
        await api.wait_for(lambda: sorted(j["metadata"]["name"] for j in api.jobs(namespace)
                                          if j["metadata"]["name"].startswith("rb-")) == ["rb-ptst-1-1"],
                           what="the run's Jobs released")
        # A queued run suspended and resumed: through its Job's Kueue Workload (list, patch).
        await api.create(RUNS, run_manifest("rq", namespace, queueName="gpu"))
        job = await api.wait_job("rq-bridge-1", namespace)
        await api.create(WORKLOADS, {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": "job-rq-bridge-1-0a1b2", "namespace": namespace,
                         "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
            "spec": {"queueName": "gpu", "active": True}})
        await player.suspend_by_queue("rq-bridge-1", False, namespace)  # admitted
        await api.patch(RUNS, namespace, "rq", {"spec": {"suspend": True}})
        await api.wait_for(lambda: api.get(WORKLOADS, namespace, "job-rq-bridge-1-0a1b2")["spec"]["active"] is False,
                           what="the Workload deactivated")
        await player.suspend_by_queue("rq-bridge-1", True, namespace)  # Kueue evicted it
        await api.patch(RUNS, namespace, "rq", {"spec": {"suspend": False}})
        await api.wait_for(lambda: api.get(WORKLOADS, namespace, "job-rq-bridge-1-0a1b2")["spec"]["active"] is True,
                           what="the Workload active again")
        await asyncio.sleep(0.2)
    assert sorted(j["metadata"]["name"] for j in api.jobs(namespace)) == ["rb-ptst-1-1", "rq-bridge-1"]
    assert api.get("batch/v1/jobs", namespace, "rq-bridge-1")["spec"]["suspend"] is True  # never the operator's


@pytest.mark.parametrize("mode", ["default", "namespaced", "ha", "ha-namespaced"])
async def test_rbac_grants_exactly_the_calls_the_operator_makes(mode):
    values = VALUE_SETS[mode]
    objects = render(values)
    args = parse_args(operator_args(values))
    watched = values.get("watchNamespaces") or []
    namespace = watched[0] if watched else "default"
    peerings = of_kind(objects, "KopfPeering" if watched else "ClusterKopfPeering")
    peering = next((p for p in peerings if p["metadata"].get("namespace") in (None, namespace)), None)
    assert (peering is not None) == bool(values.get("ha", {}).get("enabled"))

    async with cluster_api() as api:
        declare_cluster_extras(api)
        await exercise(api, kopf_options(args), namespace, peering)
        needed, namespaces = requested(api)
        needed |= owner_finalizer_rules(api)

    account = {"kind": "ServiceAccount", "name": one(objects, "ServiceAccount")["metadata"]["name"], "namespace": NAMESPACE}
    if watched:
        # Namespaced permissions only: no ClusterRole, a Role in each watched namespace,
        # and every request went to one of them.
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
        assert namespaces <= set(watched), f"requests outside the watched namespaces: {namespaces - set(watched)}"
        # (The uninstall hook's Role, in the release's namespace, is the hook's: see
        # test_cluster_uninstall, where the hook's command runs with the chart's token.)
        roles = [r for r in of_kind(objects, "Role") if not r["metadata"]["name"].endswith("-uninstall")]
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
        for role in roles:
            assert granted(role["rules"]) == needed, diff(granted(role["rules"]), needed)
        bindings = [b for b in of_kind(objects, "RoleBinding") if not b["metadata"]["name"].endswith("-uninstall")]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
        for binding in bindings:
            assert binding["subjects"] == [account] and binding["roleRef"]["kind"] == "Role"
    else:
        (role,) = of_kind(objects, "ClusterRole")
        assert granted(role["rules"]) == needed, diff(granted(role["rules"]), needed)
        (binding,) = of_kind(objects, "ClusterRoleBinding")
        assert binding["subjects"] == [account] and binding["roleRef"]["name"] == role["metadata"]["name"]


def diff(grant: set[Rule], need: set[Rule]) -> str:
    return f"granted but never used: {sorted(grant - need)}; used but not granted: {sorted(need - grant)}"
