"""The generated CRD: in sync with the models, accepted by Kubernetes, structural, complete."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from crd_harness import (
    apply_defaults,
    cel_errors,
    compile_rule,
    openapi_schema,
    structural_errors,
    structural_problems,
    unsupported_functions,
    validation_rules,
)
from visionr1_operator import api
from visionr1_operator.cli import main
from visionr1_operator.crd import build_crd, render_crd_yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "visionr1run.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# Recent Kubernetes minor versions whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31", "1.33", "1.35")


@pytest.fixture(scope="module")
def crd() -> dict:
    return build_crd()


def test_checked_in_crd_is_the_generated_one():
    assert CRD_FILE.read_text() == render_crd_yaml(), (
        "crds/visionr1run.yaml is out of date with operator/visionr1_operator/api.py: run `make crd`"
    )


def test_cli_crd_prints_it(capsys):
    assert main(["crd"]) == 0
    out = capsys.readouterr().out
    assert out == render_crd_yaml()
    assert yaml.safe_load(out) == build_crd()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_object_is_valid_for_kubernetes(version, crd):
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    if version not in shipped:
        pytest.skip(f"kubernetes-validate {kubernetes_validate.__version__} has no {version} schemas")
    # strict: an unknown key anywhere in the CRD object (a typo such as
    # x-kubernetes-validation) is an error, not silently dropped by the server.
    assert kubernetes_validate.validate(crd, version, strict=True) == version


def test_schema_is_structural(crd):
    assert structural_problems(openapi_schema(crd)) == []


def test_structural_check_catches_what_the_api_server_refuses():
    bad = {
        "type": "object",
        "properties": {
            "untyped": {"description": "no type"},
            "ref": {"$ref": "#/definitions/X"},
            "closed": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": False,
            },
            "union": {"type": "string", "anyOf": [{"type": "string"}, {"type": "null"}]},
            "count": {"type": "integer", "minimum": 1, "default": 0},
            "mixed": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            # The bug a real API server found: constraints inside the int-or-string branches.
            "quantity": {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+$"}],
            },
            "swapped": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "string"}, {"type": "integer"}]},
        },
    }
    problems = "\n".join(structural_problems(bad))
    for expected in (
        "untyped: no type",
        "ref: $ref",
        "closed: additionalProperties: false",
        "union: anyOf",
        "count: default:",
        "mixed: properties and additionalProperties",
        "quantity: anyOf",
        "swapped: anyOf",
    ):
        assert expected in problems


def _int_or_string_nodes(node, path="spec"):
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string"):
            yield path, node
        for key, child in node.get("properties", {}).items():
            yield from _int_or_string_nodes(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _int_or_string_nodes(node[key], f"{path}[]")


def test_int_or_string_nodes_have_exactly_the_structural_any_of(crd):
    """apiextensions-apiserver accepts only anyOf [{type: integer}, {type: string}] under
    x-kubernetes-int-or-string; quantities keep their syntax check as a CEL rule."""
    nodes = dict(_int_or_string_nodes(openapi_schema(crd)))
    assert {p.rsplit(".", 1)[-1] for p in nodes} >= {"cpu", "memory", "sharedMemory"}
    for path, node in nodes.items():
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        assert set(node) - {"description", "default"} == {
            "x-kubernetes-int-or-string", "anyOf", "x-kubernetes-validations"
        }, path


def test_names_version_subresource_and_columns(crd):
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "visionr1runs.visionr1.io"
    assert spec["group"] == api.GROUP == "visionr1.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "VisionR1Run",
        "listKind": "VisionR1RunList",
        "plural": "visionr1runs",
        "singular": "visionr1run",
        "shortNames": ["vr1"],
        "categories": ["visionr1"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Stage", "Reward", "Age"} <= set(columns)
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _undocumented(node: dict, path: str) -> list[str]:
    missing = []
    for name, child in node.get("properties", {}).items():
        if not str(child.get("description", "")).strip():
            missing.append(f"{path}.{name}")
        missing += _undocumented(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            missing += _undocumented(node[key], path + suffix)
    return missing


def test_every_spec_property_is_documented(crd):
    # `kubectl explain visionr1run.spec...` shows these descriptions.
    assert _undocumented(openapi_schema(crd)["properties"]["spec"], "spec") == []


def test_every_cel_rule_compiles_and_uses_known_functions(crd):
    rules = list(validation_rules(openapi_schema(crd)))
    assert len(rules) >= 15
    for where, rule in rules:
        assert rule["message"], where
        compile_rule(rule["rule"])
        assert unsupported_functions(rule["rule"]) == set(), (
            f"{where}: {rule['rule']} calls a function the harness does not emulate"
        )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd(example, crd):
    for doc in yaml.safe_load_all(example.read_text()):
        if doc is None:
            continue
        assert structural_errors(doc, crd) == []
        assert cel_errors(doc, crd) == []


def test_defaults_fill_only_below_existing_objects(crd):
    schema = openapi_schema(crd)
    doc = {"spec": {"stages": {"ptst": [{"maxCompletionLength": 64, "numGenerations": 2}]}}}
    apply_defaults(schema, doc)
    stages = doc["spec"]["stages"]
    # stages existed: its absent objects are defaulted to {} and then filled in turn.
    assert stages["bridge"]["enabled"] is True
    assert stages["bridge"]["filters"]["maxReasoningChars"] == 60000
    assert stages["sft"]["resources"]["sharedMemory"] == "16Gi"
    assert stages["ptst"] == [{"maxCompletionLength": 64, "numGenerations": 2, "steps": 100}]
    # objects without a default stay absent, and so do their fields' defaults.
    assert "model" not in doc["spec"] and "status" not in doc
    doc = {"spec": {"model": {"name": "m", "revision": None}}}
    apply_defaults(schema, doc)
    # a null counts as absent (the server prunes it); an optional object stays unset.
    assert doc["spec"]["model"] == {
        "name": "m", "revision": None, "dtype": "bfloat16", "attnImplementation": "sdpa"
    }


def test_cel_rules_see_defaults_and_absent_fields(crd):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["data"].pop("bridgeSource")
    errors = cel_errors(doc, crd)
    assert len(errors) == 1
    assert errors[0].startswith("spec.data.bridgeSource: ")
    assert "data.bridgeSource is required when stages.bridge.enabled is true" in errors[0]
    doc["spec"]["stages"]["bridge"]["enabled"] = False
    doc["spec"]["data"]["coldStart"] = {"source": "file://./cold.jsonl"}
    assert cel_errors(doc, crd) == []


def test_harness_ptst_rules_use_kubernetes_isSorted(crd):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    stages = doc["spec"]["stages"]
    stages["grpo"]["allowUnequalBudget"] = True
    stages["ptst"] = [{"maxCompletionLength": 64, "numGenerations": 8}] * 2  # equal: sorted
    assert cel_errors(doc, crd) == []
    stages["ptst"] = copy.deepcopy(stages["ptst"]) + [{"maxCompletionLength": 32, "numGenerations": 8}]
    assert [e.split(":")[0] for e in cel_errors(doc, crd)] == ["spec.stages.ptst"]


def _cel_strings_in_lists(node: dict, path: str, in_list: bool):
    """Yield (path, node) of string nodes with CEL rules that sit inside an array."""
    if node.get("type") == "string" and node.get("x-kubernetes-validations") and in_list:
        yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _cel_strings_in_lists(child, f"{path}.{name}", in_list)
    if isinstance(node.get("items"), dict):
        yield from _cel_strings_in_lists(node["items"], f"{path}[]", True)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _cel_strings_in_lists(node["additionalProperties"], f"{path}{{}}", True)


def test_cel_rules_on_strings_in_lists_are_priced_by_a_max_length(crd):
    # The API server estimates each rule's cost from the longest string the node may hold;
    # without maxLength that is the whole request, times the list's size: the CRD is refused
    # ("estimated rule cost exceeds budget"), as it was for data.*.imageRoots.
    schema = openapi_schema(crd)
    unbounded = [p for p, n in _cel_strings_in_lists(schema, "", False) if "maxLength" not in n]
    assert unbounded == []


def test_shared_prefix_on_with_activation_checkpointing_on_is_refused_by_cel(crd):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    grpo = doc["spec"]["stages"]["grpo"]
    grpo.update(sharedPrefix="on", activationCheckpointing="on")
    assert [e.split(":")[0] for e in cel_errors(doc, crd)] == ["spec.stages.grpo.sharedPrefix"]
    grpo["activationCheckpointing"] = "auto"
    assert cel_errors(doc, crd) == []
