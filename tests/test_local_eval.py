"""The local executor with a failed eval stage: the benchmarks it scored stay in status.eval,
as on a cluster (the stage's summary carries them beside the failed one's error)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from visionr1_operator.local.display import RichDisplay
from visionr1_operator.local.executor import execute, load_status, run_dir, with_local_storage
from visionr1_operator.manifest import load_run
from visionr1_trainer.demo import prepare

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_failed_eval_stage_keeps_the_scores_it_has(tmp_path):
    inputs = prepare(tmp_path / "inputs", n=8, seed=0)
    (tmp_path / "empty").mkdir()
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["name"] = f"file://{inputs}/base-model"
    spec["storage"]["uri"] = f"file://{tmp_path}/runs"
    good = spec["data"]["benchmarks"][0]
    good["data"]["source"] = f"file://{inputs}/eval.jsonl"
    # a folder of the benchmark's files whose split names none of them
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "test.jsonl").write_text((inputs / "eval.jsonl").read_text())
    spec["data"]["benchmarks"].append(
        {"name": "missing", "format": "synthetic", "data": {"source": str(tmp_path / "other"), "split": "validation"}})
    for name in ("bridge", "sft", "grpo"):
        spec["stages"][name]["enabled"] = False
    spec["stages"]["eval"].update(maxTokens=8)
    manifest = tmp_path / "eval-only.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))

    run = with_local_storage(load_run(manifest), None)
    assert execute(run, RichDisplay(Console(file=io.StringIO(), width=120)), metrics_port=0) != 0
    status = load_status(run_dir(run))
    assert status.phase == "Failed"
    table = status.eval["benchmarks"]
    assert "accuracy" in table["synthetic"]["base"]
    assert "split 'validation'" in table["missing"]["base"]["error"]
