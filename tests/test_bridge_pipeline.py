"""The bridge stage end to end with the rule-based teacher: output, statistics, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionr1_trainer.bridge import pipeline
from visionr1_trainer.bridge.backends.rule import RuleTeacher
from visionr1_trainer.config import BridgeStageConfig, DatasetRef
from visionr1_trainer.data import read_cold, write_rows
from visionr1_trainer.data.synthetic import generate
from visionr1_trainer.runtime import StageStopped

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), 24, seed=5, n_eval=1)


@pytest.fixture(scope="module")
def source_path(source):
    """The synthetic rows plus one duplicate (same image and question, another id)."""
    rows = [json.loads(line) for line in Path(source.bridge_source).read_text().splitlines()]
    return write_rows(rows + [{**rows[3], "id": "copy-of-3"}], Path(source.root) / "with-dup.jsonl")


def make_config(out: Path, source_path, shards: int = 4, **bridge) -> BridgeStageConfig:
    return BridgeStageConfig.model_validate({
        "run": "demo", "stage": "bridge", "outputUri": f"file://{out}",
        "storage": {"uri": f"file://{out.parent}"}, "model": {"name": "file://unused"},
        "metricsPort": 0, "terminationMessagePath": str(out.parent / "termination.json"),
        "source": {"source": str(source_path)},
        "bridge": {"multimodalModel": {"backend": "rule"}, "reasoningModel": {"backend": "rule"},
                   "shards": shards, **bridge},
    })


def dataset_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dataset" / "data.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(source_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "bridge"
    summary = pipeline.run(make_config(out, source_path))
    return out, summary


def test_rule_bridge_writes_a_cold_start_set_with_stats(reference, source_path):
    out, summary = reference
    stats = json.loads((out / "dataset" / "stats.json").read_text())
    rows = dataset_rows(out)
    assert stats["samples_in"] == 25 and stats["kept"] == len(rows) == 24
    assert stats["dropped"] == {"duplicate": 1}
    assert stats["teacher"] == "rule-based (synthetic tasks only)"
    assert stats["self_reflection"]["per_sample_mean"] >= 1
    assert stats["self_reflection"]["samples_with_any"] == len(rows)
    assert stats["reasoning_chars"]["count"] == len(rows)
    assert summary["artifactUri"] == f"file://{out}/dataset" and summary["kept"] == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["conversations"][1]["value"].endswith(f"<answer> Final Answer:{row['answer']} </answer>")
        assert all((out / "dataset" / p).is_file() for p in row["images"])
    cold = read_cold(DatasetRef(source=f"file://{out}"))  # what the SFT stage reads
    assert len(cold.items) == len(rows) and not cold.skipped
    again = pipeline.run(make_config(out, source_path))  # committed: nothing to redo
    assert again == summary


def test_killed_bridge_resumes_without_duplicates_or_gaps(reference, source_path, tmp_path):
    out = tmp_path / "bridge"
    config_path = tmp_path / "stage.json"
    config_path.write_text(json.dumps(make_config(out, source_path).to_json_dict()))
    # A slow teacher, so the kill lands mid-run, through the real stage entrypoint.
    script = (
        "import sys, time\n"
        "from visionr1_trainer.bridge.backends import rule\n"
        "slow = rule.RuleTeacher.generate\n"
        "def generate(self, requests, progress=None):\n"
        "    time.sleep(0.4)\n"
        "    return slow(self, requests, progress)\n"
        "rule.RuleTeacher.generate = generate\n"
        "from visionr1_trainer.__main__ import main\n"
        f"sys.exit(main(['bridge', '--config', {str(config_path)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "trainer_image")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    marker = out / "shards" / "reason-00001" / "_COMMITTED.json"
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "dataset" / "_COMMITTED.json").exists()
    assert not (out / "shards" / "reason-00003" / "_COMMITTED.json").exists()

    calls = []
    original = RuleTeacher.generate

    def counting(self, requests, progress=None):
        calls.append([r.step for r in requests])
        return original(self, requests, progress)

    RuleTeacher.generate = counting
    try:
        pipeline.run(make_config(out, source_path))
    finally:
        RuleTeacher.generate = original
    assert all(steps and set(steps) == {"reasoning"} for steps in calls)  # phase 1 was not redone
    assert len(calls) <= 2
    assert dataset_rows(out) == dataset_rows(reference[0])


def test_stop_request_commits_finished_shards_then_resumes(reference, source_path, tmp_path, monkeypatch):
    out = tmp_path / "bridge"
    checks = iter([False, False, True])
    monkeypatch.setattr(pipeline, "stop_requested", lambda: next(checks, False))
    with pytest.raises(StageStopped):
        pipeline.run(make_config(out, source_path))
    assert sorted(p.name for p in (out / "shards").iterdir() if (p / "_COMMITTED.json").exists()) == \
        ["describe-00000", "describe-00001"]
    pipeline.run(make_config(out, source_path))
    assert dataset_rows(out) == dataset_rows(reference[0])


def test_changed_plan_is_refused(source_path, tmp_path, monkeypatch):
    out = tmp_path / "bridge"
    monkeypatch.setattr(pipeline, "stop_requested", lambda: True)
    with pytest.raises(StageStopped):
        pipeline.run(make_config(out, source_path, shards=4))
    with pytest.raises(RuntimeError, match="changed since this stage started"):
        pipeline.run(make_config(out, source_path, shards=3))


def test_broken_rows_and_non_synthetic_rows_are_counted(source, tmp_path):
    rows = [json.loads(line) for line in Path(source.bridge_source).read_text().splitlines()[:4]]
    rows[0]["image"] = "images/nowhere.png"
    rows[1]["answer"] = ""
    del rows[2]["scene"]  # the rule teacher can only bridge synthetic scenes
    path = write_rows(rows, Path(source.root) / "broken.jsonl")
    out = tmp_path / "bridge"
    summary = pipeline.run(make_config(out, path, shards=1, sampleLimit=4))
    stats = json.loads((out / "dataset" / "stats.json").read_text())
    assert stats["source"]["skipped"] == {"missing_image": 1, "empty_answer": 1}
    assert stats["samples_in"] == 2 and stats["dropped"] == {"generation_failed": 1}
    assert summary["kept"] == 1
