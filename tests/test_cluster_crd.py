"""The CRD and the invalid-manifest table, judged by a real kube-apiserver (tests/cluster/).

The fast tests (test_crd.py, test_validate_invalid.py) check the same things against a
harness; here the API server itself must accept the CRD, serve its documentation and
printer columns, and refuse every manifest OpenAPI or CEL can refuse, naming the field.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from test_validate_invalid import BASE, CASES, EXAMPLES, mutated

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
CRD_NAME = "visionr1runs.visionr1.io"


@pytest.fixture(scope="module")
def crd_cluster(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.wait_established(CRD_NAME)
    cluster.wait_for_resource("vr1")
    for namespace in namespaces_of_examples():
        cluster.kubectl_apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n")
    return cluster


def namespaces_of_examples() -> set[str]:
    found = set()
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("metadata", {}).get("namespace"):
                found.add(doc["metadata"]["namespace"])
    return found


def test_the_api_server_accepts_the_crd_and_the_charts_copy(crd_cluster):
    out = crd_cluster.kubectl("get", f"crd/{CRD_NAME}", "-o",
                              "jsonpath={.status.conditions[?(@.type=='NamesAccepted')].status}"
                              " {.status.conditions[?(@.type=='Established')].status}")
    assert out.stdout.split() == ["True", "True"]
    # The chart ships the same file; a server-side apply of it changes nothing.
    chart_crd = ROOT / "charts" / "visionr1-operator" / "crds" / "visionr1run.yaml"
    applied = crd_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(chart_crd))
    assert "serverside-applied" in applied.stdout


def test_kubectl_explain_prints_the_fields_documentation(crd_cluster):
    out = explain(crd_cluster, "vr1.spec.stages.grpo")
    assert "FIELDS:" in out
    for field in ("learningRate", "beta", "epsilonLow", "deepspeedZeroStage", "rolloutBackend"):
        assert re.search(rf"^\s+{field}\s", out, re.MULTILINE), f"{field} missing from:\n{out}"
    leaf = explain(crd_cluster, "vr1.spec.stages.grpo.beta")
    assert "DESCRIPTION:" in leaf and "KL" in leaf


def explain(cluster, path: str, timeout: float = 60.0) -> str:
    # The API server publishes a new CRD's OpenAPI (what explain reads) a few seconds
    # after the CRD is Established.
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.kubectl("explain", path, check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            assert out.returncode == 0, out.stderr
            return out.stdout
        time.sleep(1)


def test_kubectl_get_shows_the_printer_columns(crd_cluster):
    doc = mutated({"metadata.name": "columns"})
    crd_cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    try:
        header = crd_cluster.kubectl("get", "vr1", "columns").stdout.splitlines()[0].split()
        assert header == ["NAME", "PHASE", "STAGE", "REWARD", "AGE"]
        wide = crd_cluster.kubectl("get", "vr1", "columns", "-o", "wide").stdout.splitlines()[0].split()
        assert wide == ["NAME", "PHASE", "STAGE", "REWARD", "STEP", "AGE"]  # Step has priority 1
        by_category = crd_cluster.kubectl("get", "visionr1", "-o", "name").stdout
        assert "visionr1run.visionr1.io/columns" in by_category
    finally:
        crd_cluster.kubectl("delete", "vr1", "columns", "--wait=false")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_server_side_dry_run(example, crd_cluster):
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", str(example), check=False)
    assert out.returncode == 0, out.stderr
    assert "(server dry run)" in out.stdout


def test_server_side_defaults_match_the_pydantic_defaults(crd_cluster):
    """A manifest that says little comes back from the API server filled in as
    `visionr1 validate` reads it: the CRD's defaults and pydantic's agree."""
    from visionr1_operator.api import VisionR1Run
    from visionr1_trainer.config import WIRE

    doc = {k: v for k, v in BASE.items() if k != "status"}
    doc["metadata"] = {"name": "defaults-check"}
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", "-", input=json.dumps(doc))
    served = yaml.safe_load(out.stdout)
    ours = VisionR1Run.model_validate(doc, **WIRE).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert served["spec"] == ours["spec"]


SERVER_CASES = [c for c in CASES if c.where != "cli-only"]


@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda c: c.id)
def test_the_api_server_refuses_each_invalid_manifest_naming_the_field(case, crd_cluster):
    doc = mutated(case.changes)
    # JSON, not YAML: PyYAML writes the string "1e-4" bare, which kubectl's YAML 1.2
    # reads back as a number; JSON keeps every value's type as the case means it.
    out = crd_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode != 0, f"the API server accepted {case.id}"
    assert case.path in server_paths(out.stderr) or any(
        case.path.startswith((where + ".", where + "[")) for where in server_paths(out.stderr)
    ), f"{case.path} not named in:\n{out.stderr}"


def server_paths(stderr: str) -> set[str]:
    """The field paths a refusal names, in the three forms the API server and kubectl use:
    a field error (``spec.x: Invalid value``; a CEL rule on an object reports there plus
    its fieldPath), strict decoding (``unknown field "spec.x"``), and an apiVersion or
    kind that no CRD serves (``no matches for kind``)."""
    paths = set(re.findall(r"((?:spec|metadata)[\w.\[\]]*): ", stderr))
    paths |= set(re.findall(r'unknown field "([^"]+)"', stderr))
    if "no matches for kind" in stderr:
        paths |= {"apiVersion", "kind"}
    return paths
