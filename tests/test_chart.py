"""The Helm chart, rendered with real Helm (helm-python-sdk), for the default values and
the other install modes: lint, the Kubernetes schemas, hardening, the wiring between
objects (selectors, ports, flags), and values.schema.json's refusals. RBAC exactness is
tests/test_chart_rbac.py."""

from __future__ import annotations

import json
import tomllib

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_harness import CHART, NAMESPACE, ROOT, VALUE_SETS, crds, of_kind, one, operator_args, render, render_files

from visionr1_operator import __version__
from visionr1_operator.cluster.__main__ import parse_args
from visionr1_operator.crd import render_crd_yaml
from visionr1_operator.cluster.jobs import build_job
from visionr1_operator.cluster.naming import CONTAINER, Owner
from visionr1_operator.manifest import validate_document
from visionr1_operator.plan import DEFAULT_TRAINER_IMAGE, build_plan

KUBERNETES_VERSIONS = ("1.29", "1.35")  # the chart's kubeVersion floor and a recent one
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_lint_is_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("mode", sorted(VALUE_SETS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_passes_the_kubernetes_schemas(mode, version):
    objects = render(VALUE_SETS[mode])
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue  # custom resources: checked against their CRDs below
        assert kubernetes_validate.validate(obj, version, strict=True) == version, obj["kind"]


@pytest.mark.parametrize("mode", sorted(VALUE_SETS))
def test_operator_flags_parse_with_the_operators_own_parser(mode):
    values = VALUE_SETS[mode]
    args = parse_args(operator_args(values))  # exits (SystemExit) on a flag the operator lacks
    watched = values.get("watchNamespaces") or []
    assert args.namespace == watched and args.no_cluster_scan == bool(watched)
    ha = values.get("ha", {}).get("enabled", False)
    assert args.standalone != ha and (args.peering is not None) == ha


@pytest.mark.parametrize("mode", sorted(VALUE_SETS))
def test_no_wildcards_and_nothing_on_secrets(mode):
    objects = render(VALUE_SETS[mode])
    for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


@pytest.mark.parametrize("mode", sorted(VALUE_SETS))
def test_the_operator_pod_is_hardened(mode):
    objects = render(VALUE_SETS[mode])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = parse_args(operator_args(VALUE_SETS[mode]))
    assert ports == {"metrics": args.metrics_port, "health": args.health_port}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}  # kopf's liveness endpoint
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the only writable path
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]


def test_images_default_to_the_app_version_and_custom_ones_are_used():
    assert CHART_META["appVersion"] == __version__
    assert CHART_META["appVersion"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"visionr1/operator:{CHART_META['appVersion']}"
    args = parse_args(operator_args())
    assert args.trainer_image == DEFAULT_TRAINER_IMAGE == f"visionr1/trainer:{CHART_META['appVersion']}"

    values = VALUE_SETS["custom-images"]
    objects = render(values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/visionr1-operator:0.1.0-rc1"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert parse_args(operator_args(values)).trainer_image == "registry.example.com/ml/visionr1-trainer:cu128-0.1.0"
    assert one(objects, "ServiceAccount")["metadata"]["annotations"] == values["serviceAccount"]["annotations"]


def test_the_charts_crd_is_the_generated_one():
    chart_crd = (CHART / "crds" / "visionr1run.yaml").read_text()
    assert chart_crd == (ROOT / "crds" / "visionr1run.yaml").read_text() == render_crd_yaml(), (
        "run `make crd`: it writes crds/ and the chart's crds/")
    kinds = sorted(c["spec"]["names"]["kind"] for c in crds())
    assert kinds == ["ClusterKopfPeering", "KopfPeering", "VisionR1Run"]
    for version in KUBERNETES_VERSIONS:
        for crd in crds():
            assert kubernetes_validate.validate(crd, version, strict=True) == version


def test_default_is_one_standalone_replica_that_never_overlaps_itself():
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in operator_args()
    assert not of_kind(objects, "PodDisruptionBudget") and not of_kind(objects, "ClusterKopfPeering")
    assert not of_kind(objects, "ServiceMonitor") and not of_kind(objects, "PodMonitor")
    assert [o["kind"] for o in objects if o["kind"] == "ConfigMap"] == []  # no dashboard unless asked


@pytest.mark.parametrize("mode", ["ha", "ha-namespaced"])
def test_ha_replicas_share_a_peering_object(mode):
    values = VALUE_SETS[mode]
    objects = render(values)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == values["ha"].get("replicas", 2) and "strategy" not in deployment["spec"]
    args = operator_args(values)
    assert "--priority=auto" in args and "--standalone" not in args
    peering = parse_args(args).peering
    watched = values.get("watchNamespaces")
    kind = "KopfPeering" if watched else "ClusterKopfPeering"
    peerings = of_kind(objects, kind)
    assert [p["metadata"]["name"] for p in peerings] == [peering] * len(watched or [None])
    if watched:
        assert sorted(p["metadata"]["namespace"] for p in peerings) == sorted(watched)
    crd = next(c for c in crds() if c["spec"]["names"]["kind"] == kind)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for obj in peerings:
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
        jsonschema.validate(obj, schema)
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"]


def test_namespaced_mode_watches_only_the_listed_namespaces():
    values = VALUE_SETS["namespaced"]
    args = operator_args(values)
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=research", "--namespace=team-a"]
    assert "--no-cluster-scan" in args


def stage_pod_template() -> dict:
    """The pod template the operator builds for a real run's GRPO stage."""
    doc = yaml.safe_load((ROOT / "examples" / "vision-r1-7b.yaml").read_text())
    run = validate_document(doc)
    plan = next(p for p in build_plan(run, DEFAULT_TRAINER_IMAGE) if p.name == "ptst-1")
    job = build_job(Owner(run.metadata.name, "research", "uid-1"), run.spec, plan, 1, suspend=False)
    return job["spec"]["template"]


def test_monitoring_wiring_selects_what_it_should():
    values = VALUE_SETS["monitoring"]
    objects = render(values)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert set(service["spec"]["selector"].items()) <= set(pod_labels.items())
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"

    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # The PodMonitor finds the trainer pods the operator really builds, on their metrics port.
    podmonitor = one(objects, "PodMonitor")
    template = stage_pod_template()
    labels = template["metadata"]["labels"]
    selector = podmonitor["spec"]["selector"]
    assert set(selector["matchLabels"].items()) <= set(labels.items())
    for expr in selector["matchExpressions"]:
        assert expr["operator"] == "Exists" and expr["key"] in labels
    container = next(c for c in template["spec"]["containers"] if c["name"] == CONTAINER)
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in container["ports"]}
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["interval"] == "10s"
    assert podmonitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = one(render({**values, "watchNamespaces": ["research"]}), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["research"]}

    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's label
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "VisionR1"}
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((CHART / "dashboards" / "visionr1.json").read_text())


def test_notes_tell_how_to_apply_and_watch_a_run():
    notes = render_files()["visionr1-operator/templates/NOTES.txt"]
    assert "kubectl apply --server-side" in notes and "examples/vision-r1-7b.yaml" in notes
    # The example's own name and namespace (kubectl refuses a -n that contradicts the file's).
    example = yaml.safe_load((ROOT / "examples" / "vision-r1-7b.yaml").read_text())["metadata"]
    ns = f"-n {example['namespace']}"
    assert f"kubectl wait --for=condition=Succeeded vr1/{example['name']} {ns}" in notes
    assert f"kubectl get vr1 {ns} -w" in notes and "crds/" in notes
    namespaced = render_files(VALUE_SETS["namespaced"])["visionr1-operator/templates/NOTES.txt"]
    assert "research, team-a" in namespaced and "must be one of the watched namespaces" in namespaced


@pytest.mark.parametrize("values, field", [
    ({"watchNamespaces": ["team-*"]}, "watchNamespaces"),
    ({"ha": {"enabled": True, "replicas": 1}}, "replicas"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"imagePullSecret": [{"name": "x"}]}, "imagePullSecret"),  # a typo, not silently ignored
    ({"metrics": {"podMonitor": {"interval": "often"}}}, "interval"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
])
def test_bad_values_are_refused_naming_the_field(values, field):
    with pytest.raises(helm_python.HelmError) as error:
        render_files(values)
    assert field in str(error.value)


def test_a_service_monitor_without_its_service_is_refused():
    with pytest.raises(helm_python.HelmError, match="metrics.service.enabled"):
        render_files({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


def test_an_existing_service_account_must_be_named():
    with pytest.raises(helm_python.HelmError, match="serviceAccount.name is required"):
        render_files({"serviceAccount": {"create": False}})
    objects = render({"serviceAccount": {"create": False, "name": "ops"}})
    assert not of_kind(objects, "ServiceAccount")
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ops"
