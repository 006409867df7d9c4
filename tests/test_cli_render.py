"""`visionr1 render FILE`: the objects the operator creates for each stage's first attempt."""

from __future__ import annotations

from pathlib import Path

import yaml

from visionr1_operator.cli import main, render_objects
from visionr1_operator.manifest import load_run
from visionr1_operator.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]


def test_render_prints_configmap_and_job_per_stage_and_a_service_for_multi_node(capsys):
    path = ROOT / "examples" / "multinode.yaml"
    assert main(["render", str(path)]) == 0
    out, err = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(out) if d]
    plans = build_plan(load_run(path))
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == [f"{p.config.run}-{p.name}-1" for p in plans]
    assert sum(d["kind"] == "ConfigMap" for d in docs) == len(plans)
    multi = [p for p in plans if p.resources.nodes > 1]
    assert multi and sum(d["kind"] == "Service" for d in docs) == len(multi)
    # The owner reference needs the run's uid, which only the API server assigns.
    assert all("ownerReferences" not in d["metadata"] for d in docs)


def test_render_uses_the_same_builder_as_the_operator():
    run = load_run(ROOT / "examples" / "tiny-cpu.yaml")
    from visionr1_operator.cluster.jobs import build_stage_objects
    from visionr1_operator.cluster.naming import Owner

    plan = build_plan(run)[0]
    expected = build_stage_objects(Owner(run.name, run.namespace, ""), run.spec, plan, 1, suspend=False)
    for obj in expected:
        obj["metadata"].pop("ownerReferences", None)
    assert render_objects(run)[: len(expected)] == expected


def test_render_of_an_invalid_manifest_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples" / "tiny-cpu.yaml").read_text().replace("name: tiny-cpu", "name: Tiny", 1))
    assert main(["render", str(bad)]) == 1
    assert "metadata.name" in capsys.readouterr().err
