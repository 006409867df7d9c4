"""The embedded executor end to end: every stage of a micro run, kill and resume, the report."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from visionr1_operator.cli import main as cli
from visionr1_operator.local.executor import execute, load_status, run_dir, with_local_storage
from visionr1_operator.local.display import RichDisplay
from visionr1_operator.manifest import load_run
from visionr1_operator.local.report import load_run_data, write_report
from visionr1_trainer.demo import prepare
from test_local_guards import as_from_a_terminal
from visionr1_trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
# Each test runs several stage processes (interpreter, torch and model start-up each);
# on two loaded cores that can pass the default 300 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def micro_manifest(tmp: Path, inputs: Path, ptst_steps: int = 2) -> Path:
    """examples/tiny-cpu.yaml cut down to seconds per stage, with its inputs under ``inputs``."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["name"] = f"file://{inputs}/base-model"
    spec["storage"]["uri"] = f"file://{tmp}/runs"
    spec["data"]["bridgeSource"]["source"] = f"file://{inputs}/bridge-source.jsonl"
    spec["data"]["rl"]["source"] = f"file://{inputs}/rl.jsonl"
    spec["data"]["benchmarks"][0]["data"]["source"] = f"file://{inputs}/eval.jsonl"
    stages = spec["stages"]
    stages["bridge"]["sampleLimit"] = 16
    stages["sft"].update(epochs=1, saveEverySteps=1)
    stages["grpo"].update(rolloutBatchSize=4, saveEverySteps=1)
    stages["ptst"] = [
        {"maxCompletionLength": 16, "numGenerations": 4, "steps": ptst_steps},
        {"maxCompletionLength": 32, "numGenerations": 2, "steps": 2},
    ]
    stages["eval"].update(maxTokens=16)
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("inputs"), n=16, seed=0)


def quiet_display() -> RichDisplay:
    return RichDisplay(Console(file=io.StringIO(), width=120))


def test_every_stage_runs_and_the_report_holds_what_was_logged(tmp_path, inputs):
    run = with_local_storage(load_run(micro_manifest(tmp_path, inputs)), None)
    assert execute(run, quiet_display(), metrics_port=0) == 0
    directory = run_dir(run)
    status = load_status(directory)
    assert status.phase == "Succeeded"
    assert [(s.name, s.state, s.attempts) for s in status.stages] == [
        ("bridge", "Succeeded", 1), ("sft", "Succeeded", 1), ("ptst-1", "Succeeded", 1),
        ("ptst-2", "Succeeded", 1), ("eval", "Succeeded", 1),
    ]
    assert {c.type for c in status.conditions if c.status == "True"} >= {"Succeeded", "Ready"}
    assert status.eval  # the eval summary is in the run's status, as on a cluster
    assert all(s.artifact_uri and s.summary for s in status.stages)

    index, plots = write_report(directory)
    assert index.exists() and "<img" in index.read_text()
    assert plots["ptst"].exists() and plots["sft"].exists() and plots["bridge"].exists() and plots["eval"].exists()
    data = load_run_data(directory)
    for stage in ("sft", "ptst-1", "ptst-2"):
        logged = read_jsonl(directory / stage / "_work" / "metrics.jsonl")
        assert data.logs[stage] == logged and logged  # the report reads exactly the logged series
    assert [r["step"] for r in data.logs["ptst-1"]] == [1, 2]

    # A second invocation finds everything committed and repeats nothing.
    assert execute(run, quiet_display(), metrics_port=0) == 0
    assert [s.attempts for s in load_status(directory).stages] == [1, 1, 1, 1, 1]


def _executor(manifest: Path) -> subprocess.Popen:
    # A new session: the test can kill the executor together with the stage it runs.
    return subprocess.Popen([sys.executable, "-m", "visionr1_operator.cli", "run", str(manifest), "--metrics-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=as_from_a_terminal)


def test_a_run_killed_mid_ptst_finishes_with_no_stage_repeated(tmp_path, inputs):
    manifest = micro_manifest(tmp_path, inputs, ptst_steps=6)
    directory = run_dir(with_local_storage(load_run(manifest), None))
    checkpoint = directory / "ptst-1" / "checkpoints" / "step-00000002" / "_COMMITTED.json"
    proc = _executor(manifest)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "ptst-1 never committed its second checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # executor and stage die together, mid-stage
    proc.wait(timeout=30)

    assert cli(["run", str(manifest), "--metrics-port", "0"]) == 0
    status = load_status(directory)
    assert status.phase == "Succeeded"
    attempts = {s.name: s.attempts for s in status.stages}
    assert attempts == {"bridge": 1, "sft": 1, "ptst-1": 2, "ptst-2": 1, "eval": 1}
    for stage in ("bridge", "sft"):  # finished stages ran once: one start in their logs
        assert len(read_jsonl(directory / stage / "_work" / "metrics.jsonl", kind="start")) == 1
    log = directory / "ptst-1" / "_work" / "metrics.jsonl"
    starts = read_jsonl(log, kind="start")
    assert starts[-1]["resumed"] is True and starts[-1]["step"] >= 2
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5, 6]


def test_status_and_errors_from_the_cli(tmp_path, inputs, capsys):
    assert cli(["status", str(tmp_path / "nowhere")]) == 1
    assert "no local run here" in capsys.readouterr().err
    assert cli(["report", str(tmp_path)]) == 1
    assert "no status.json" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: VisionR1Run\n")
    assert cli(["run", str(bad)]) == 1
    assert "apiVersion" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_stage_commits_and_the_run_resumes(tmp_path, inputs):
    manifest = micro_manifest(tmp_path, inputs, ptst_steps=12)
    directory = run_dir(with_local_storage(load_run(manifest), None))
    log = directory / "ptst-1" / "_work" / "metrics.jsonl"
    proc = _executor(manifest)
    deadline = time.monotonic() + 240
    while not (log.exists() and len(read_jsonl(log)) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "ptst-1 never logged two steps"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the group
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "run the same command again to resume" in " ".join(output.split())
    status = load_status(directory)
    record = {s.name: s for s in status.stages}["ptst-1"]
    assert status.phase == "Suspended" and record.state == "Pending" and record.message == "stopped on request (SIGINT)"
    done = len(read_jsonl(log))
    assert (directory / "ptst-1" / "checkpoints" / f"step-{done:08d}" / "_COMMITTED.json").exists()

    assert cli(["run", str(manifest), "--metrics-port", "0"]) == 0
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, 13))
    assert load_status(directory).phase == "Succeeded"
