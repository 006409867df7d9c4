"""bench/ablation.py and its manifests: the rows compare like with like, the CLI refuses bad input.

No training runs here (the sweep is minutes per row); what is checked is what makes the
table a fair comparison: every RL row has the same total GRPO steps, the same sampling
budget per step (maxCompletionLength x numGenerations, the paper's constant), the same
GRPO and eval settings, and the PTST shapes the paper's rows name.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from visionr1_operator.manifest import validate_document

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

RL_ROWS = ("zero", "long", "ptst", "fixed-short", "ptst-3")


def stages(row):
    return ablation.load_manifest(row)["spec"]["stages"]


def test_every_row_has_a_valid_manifest():
    assert sorted(p.stem for p in ablation.MANIFESTS.glob("*.yaml")) == sorted(ablation.ROWS)
    for row in ablation.ROWS:
        run = validate_document(ablation.load_manifest(row), f"{row}.yaml")
        assert run.name == f"ablation-{row}"


def test_rl_rows_share_steps_budget_and_settings():
    budgets = {row: [p["maxCompletionLength"] * p["numGenerations"] for p in stages(row)["ptst"]] for row in RL_ROWS}
    assert len({b for per_row in budgets.values() for b in per_row}) == 1, budgets
    assert len({sum(p["steps"] for p in stages(row)["ptst"]) for row in RL_ROWS}) == 1
    assert all(stages(row)["grpo"] == stages("ptst")["grpo"] for row in RL_ROWS)
    # Scored alike; which models are scored (includeBaselines) may differ.
    scoring = {row: {k: v for k, v in stages(row)["eval"].items() if k != "includeBaselines"} for row in ablation.ROWS}
    assert all(s == scoring["ptst"] for s in scoring.values())


def test_rows_have_the_papers_shapes():
    lengths = {row: [p["maxCompletionLength"] for p in stages(row)["ptst"]] for row in RL_ROWS}
    short, long = min(lengths["ptst"]), max(lengths["long"])
    assert lengths["ptst"] == [short, 2 * short]  # 4K -> 8K
    assert lengths["long"] == [long, long] and long == 4 * short  # 16K, 4 x 4K
    assert lengths["fixed-short"] == [short, short]
    assert len(lengths["ptst-3"]) == 3 and lengths["ptst-3"][0] == short
    assert lengths["ptst-3"][-1] == lengths["ptst"][-1] and sorted(lengths["ptst-3"]) == lengths["ptst-3"]
    assert lengths["zero"] == lengths["long"]
    for row in ablation.FROM_CI:
        assert ablation.load_manifest(row)["spec"]["model"]["name"] == ablation.CI_MODEL
        assert stages(row)["sft"]["enabled"] is False and stages(row)["bridge"]["enabled"] is False
    assert ablation.load_manifest("zero")["spec"]["model"]["name"].endswith("/inputs/base-model")
    assert stages("ci")["grpo"]["enabled"] is False


def test_seeded_manifest_changes_only_names_paths_and_seeds(tmp_path):
    for row in ablation.ROWS:
        doc = ablation.seeded_manifest(row, 2, tmp_path)
        validate_document(doc, row)
        assert doc["metadata"]["name"] == f"{row}-s2"
        text = json.dumps(doc)
        assert "./runs" not in text and str(tmp_path / "seed-2" / "inputs") in text
        original = ablation.load_manifest(row)
        for stage, settings in doc["spec"]["stages"].items():
            if isinstance(settings, dict) and settings.get("enabled", True) and stage in ("bridge", "sft", "grpo"):
                assert settings.pop("seed") == 2
            assert settings == original["spec"]["stages"][stage], stage
    ptst = ablation.seeded_manifest("ptst", 1, tmp_path)
    assert ptst["spec"]["model"]["name"] == f"file://{tmp_path}/runs/default/ci-s1/sft"


@pytest.mark.parametrize("argv, message", [
    (["--rows", "ptst,nope"], "unknown row(s) nope"),
    (["--rows", ","], "unknown row(s) (none given)"),
    (["--seeds", "0"], "--seeds: must be at least 1"),
])
def test_cli_refuses_bad_input(argv, message, capsys, tmp_path):
    assert ablation.main([*argv, "--out", str(tmp_path / "out.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_a_corrupt_results_file_is_refused_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("{not json")
    assert ablation.main(["--figure", "--out", str(out)]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert out.read_text() == "{not json"


def test_summary_table_and_figure(tmp_path, monkeypatch):
    seeds = {str(i): {"accuracy": a, "reasoning_tokens": r, "completion_tokens": r + 8, "clipped_ratio": 0.0}
             for i, (a, r) in enumerate([(0.5, 60.0), (0.7, 40.0), (0.6, 50.0)])}
    seeds["3"] = {"error": "ptst-s3: visionr1 run exited 1"}
    data = {"rows": {"ptst": {"seeds": seeds, "summary": ablation.aggregate(seeds)}}}
    summary = data["rows"]["ptst"]["summary"]
    assert summary["seeds_done"] == 3
    assert summary["accuracy"] == {"mean": 0.6, "min": 0.5, "max": 0.7, "stdev": 0.1}
    table = ablation.markdown_table(data)
    assert "| ptst | 2057 | 55.4 | 3 | 60.0% (50.0-70.0) | 50.0 (40.0-60.0) |" in table
    assert "| ci | 3566 | 44.5 | 0 | not run |" in table
    assert "base (pretrained" not in table  # the zero row did not run: no base line
    data["rows"]["zero"] = {"seeds": {"0": {**seeds["0"], "wall_seconds": 5.0, "models": {
        "base": {"accuracy": 0.8, "reasoning_tokens": 0.0, "completion_tokens": 30.0, "clipped_ratio": 0.0,
                 "perception": 0.85}}}}}
    data["rows"]["zero"]["summary"] = ablation.aggregate(data["rows"]["zero"]["seeds"])
    table = ablation.markdown_table(data)
    assert "| base (pretrained, no RL) | - | - | 1 | 80.0% (80.0-80.0) | 0.0 (0.0-0.0) | 30.0 | 0.000 | 85.0% (85.0-85.0) |" in table
    for k in seeds:
        seeds[k]["wall_seconds"] = 10.0
    per_seed = ablation.per_seed_table(data)
    assert "| base | 80.0%, 0.0 | not run | not run | not run |" in per_seed
    assert "| ptst | 50.0%, 60.0 (10 s) | 70.0%, 40.0 (10 s) | 60.0%, 50.0 (10 s) | failed |" in per_seed
    path = ablation.figure(data, tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_sweep_keeps_what_finished_and_skips_it_next_time(tmp_path, monkeypatch):
    import visionr1_trainer.demo as demo

    calls = []

    def fake_run(row, seed, work, log):
        calls.append((row, seed))
        if row == "long":
            raise ablation.BenchError(f"{row}-s{seed}: visionr1 run exited 1")
        return {"accuracy": 0.5, "reasoning_tokens": 10.0, "completion_tokens": 20.0, "clipped_ratio": 0.0}

    monkeypatch.setattr(ablation, "run_row", fake_run)
    monkeypatch.setattr(demo, "prepare", lambda *a, **k: None)
    (tmp_path / "runs" / "default" / "ci-s0" / "sft").mkdir(parents=True)
    out = tmp_path / "out.json"
    data = ablation.sweep(["ptst", "long", "ci"], 1, out, tmp_path, log=lambda *_: None)
    assert calls == [("ci", 0), ("ptst", 0), ("long", 0)]  # ci first, whatever the order asked
    assert data["rows"]["long"]["seeds"]["0"] == {"error": "long-s0: visionr1 run exited 1"}
    assert data["runs"][-1]["failures"] == ["long-s0: visionr1 run exited 1"]
    assert json.loads(out.read_text())["rows"]["ptst"]["summary"]["seeds_done"] == 1
    calls.clear()
    ablation.sweep(["ci", "ptst", "long"], 1, out, tmp_path, log=lambda *_: None)
    assert calls == [("long", 0)]  # only the one that failed runs again
