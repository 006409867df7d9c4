"""The local executor never runs stale or twice (issue 19, findings 9-12; issue 15, item 5).

Every test drives real `visionr1 run` subprocesses on a tiny run: the bridge alone (rule
teacher, 16 rows, seconds), or the bridge and a 2-step SFT. A slow teacher, for tests
that need a stage to be running when they act, is the rule teacher made to sleep before
each call, through a ``sitecustomize`` on the stage's PYTHONPATH (no CPU spent waiting).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from visionr1_operator.api import StageStatus, VisionR1RunStatus
from visionr1_operator.cli import main as cli
from visionr1_operator.local.display import print_status
from visionr1_operator.local.executor import load_status
from visionr1_trainer.demo import prepare
from visionr1_trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SLOW_TEACHER = """\
import os
_delay = float(os.environ.get("VR1_TEST_TEACHER_DELAY") or 0)
if _delay:
    import time
    from visionr1_trainer.bridge.backends import rule
    _generate = rule.RuleTeacher.generate
    def generate(self, requests, progress=None):
        time.sleep(_delay)
        return _generate(self, requests, progress)
    rule.RuleTeacher.generate = generate
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("inputs"), n=16, seed=0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = tmp_path_factory.mktemp("site")
    (path / "sitecustomize.py").write_text(SLOW_TEACHER)
    return path


def manifest(tmp: Path, inputs: Path, sft: bool = False, source: str | None = None, **bridge) -> Path:
    doc = {
        "apiVersion": "visionr1.io/v1alpha1", "kind": "VisionR1Run", "metadata": {"name": "guard"},
        "spec": {
            "model": {"name": f"file://{inputs}/base-model", "dtype": "float32", "attnImplementation": "sdpa"},
            "storage": {"uri": f"file://{tmp}/runs"},
            "data": {"bridgeSource": {"source": source or f"file://{inputs}/bridge-source.jsonl"}},
            "stages": {
                "bridge": {"multimodalModel": {"backend": "rule"}, "reasoningModel": {"backend": "rule"},
                           "sampleLimit": 16, "shardSize": 2, "resources": {"gpusPerNode": 0}, **bridge},
                "sft": {"enabled": sft, "epochs": 1, "learningRate": 3.0e-3, "cutoffLength": 512,
                        "perDeviceBatchSize": 8, "precision": "fp32", "deepspeedZeroStage": 0,
                        "saveEverySteps": 1, "resources": {"gpusPerNode": 0}},
                "grpo": {"enabled": False},
                "eval": {"enabled": False},
            },
        },
    }
    path = tmp / "guard.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "default" / "guard"


def env(site: Path, delay: float = 0.0) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "VR1_TEST_TEACHER_DELAY": str(delay), "COLUMNS": "200"}


def as_from_a_terminal() -> None:
    """In the child: SIGINT and SIGTERM as a terminal's shell leaves them. A suite started
    in the background (nohup, ``cmd &`` in a script) inherits SIGINT ignored, and the
    executor rightly keeps an ignored signal ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def spawn(path: Path, site: Path, delay: float = 0.0) -> subprocess.Popen:
    """`visionr1 run` in its own session (signals reach it alone unless sent to its group)."""
    return subprocess.Popen([sys.executable, "-m", "visionr1_operator.cli", "run", str(path), "--metrics-port", "0"],
                            cwd=ROOT, env=env(site, delay), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=as_from_a_terminal)


def run(path: Path, site: Path, delay: float = 0.0, timeout: float = 300) -> tuple[int, str]:
    proc = spawn(path, site, delay)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, " ".join(out.split())


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the executor exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def marker(directory: Path, artifact: str) -> Path:
    return directory / artifact / "_COMMITTED.json"


def starts(directory: Path, stage: str) -> int:
    return len(read_jsonl(directory / stage / "_work" / "metrics.jsonl", kind="start"))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- finding 9: stale inputs ------------------------------------------------------------------


def test_a_rebuilt_upstream_stage_reruns_the_stage_that_reads_it(tmp_path, inputs, site):
    path = manifest(tmp_path, inputs, sft=True)
    directory = run_dir(tmp_path)
    code, out = run(path, site)
    assert code == 0, out
    before = marker(directory / "sft", "model").read_bytes()

    shutil.rmtree(directory / "bridge")  # the bridge runs again: SFT's data set is new
    code, out = run(path, site)
    assert code == 0, out
    assert "sft" in out and "stage bridge was committed anew" in out
    assert marker(directory / "sft", "model").read_bytes() != before  # SFT ran again...
    assert starts(directory, "sft") == 1  # ...from scratch, not resumed on the old data
    status = load_status(directory)
    assert [(s.name, s.state) for s in status.stages] == [("bridge", "Succeeded"), ("sft", "Succeeded")]

    code, out = run(path, site)  # nothing changed now: nothing runs
    assert code == 0 and marker(directory / "sft", "model").read_bytes() != before, out
    assert starts(directory, "sft") == 1 and starts(directory, "bridge") == 1


def test_changed_settings_restart_an_interrupted_stage_and_rerun_a_finished_one(tmp_path, inputs, site):
    directory = run_dir(tmp_path)
    proc = spawn(manifest(tmp_path, inputs), site, delay=0.4)
    wait_for(lambda: marker(directory / "bridge" / "shards", "describe-00001").exists(), proc,
             "the bridge committed two shards")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert not marker(directory / "bridge", "dataset").exists()

    # Other settings for the interrupted stage: it starts afresh, saying why.
    code, out = run(manifest(tmp_path, inputs, seed=7), site)
    assert code == 0, out
    assert "bridge" in out and "bridge.seed" in out and "starting it fresh" in out
    assert starts(directory, "bridge") == 1  # one start: the interrupted attempt's work is gone
    first = marker(directory / "bridge", "dataset").read_bytes()

    # Other settings for the finished stage: it runs again (it is not silently kept).
    code, out = run(manifest(tmp_path, inputs, seed=8), site)
    assert code == 0, out
    assert "bridge.seed" in out and marker(directory / "bridge", "dataset").read_bytes() != first
    assert starts(directory, "bridge") == 1
    assert load_status(directory).stages[0].attempts == 1  # attempts count the current commit's tries


# --- finding 10: one executor per run directory --------------------------------------------


def test_a_second_executor_on_the_same_run_directory_is_refused(tmp_path, inputs, site):
    path = manifest(tmp_path, inputs)
    directory = run_dir(tmp_path)
    first = spawn(path, site, delay=0.3)
    wait_for(lambda: marker(directory / "bridge" / "shards", "describe-00000").exists(), first,
             "the first executor's bridge started")
    code, out = run(path, site)
    assert code != 0, out
    assert "in use by" in out and f"pid {first.pid}" in out, out
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    status = load_status(directory)
    assert status.phase == "Succeeded" and status.stages[0].attempts == 1
    assert starts(directory, "bridge") == 1


def test_a_stage_left_by_a_killed_executor_is_waited_for_not_run_twice(tmp_path, inputs, site):
    path = manifest(tmp_path, inputs)
    directory = run_dir(tmp_path)
    # A slow teacher: the stage takes seconds to reach its next stop point after its executor died.
    proc = spawn(path, site, delay=6.0)
    wait_for(lambda: marker(directory / "bridge" / "shards", "describe-00000").exists(), proc,
             "the bridge started")
    stage = [pid for pid in children(proc.pid) if alive(pid)]
    os.kill(proc.pid, signal.SIGKILL)  # the executor alone dies at once
    proc.wait(timeout=30)
    code, out = run(path, site)
    assert code == 0, out
    assert "still runs" in out and "waiting" in out
    assert stage and not any(alive(pid) for pid in stage)  # told to stop when its executor died
    status = load_status(directory)
    assert status.phase == "Succeeded" and status.stages[0].attempts == 2
    assert starts(directory, "bridge") == 2


# --- finding 11: signals ----------------------------------------------------------------------


def test_sigterm_stops_the_stage_and_leaves_a_status_that_says_so(tmp_path, inputs, site):
    path = manifest(tmp_path, inputs)
    directory = run_dir(tmp_path)
    proc = spawn(path, site, delay=0.4)
    wait_for(lambda: marker(directory / "bridge" / "shards", "describe-00000").exists(), proc, "the bridge started")
    stage = [pid for pid in children(proc.pid) if alive(pid)]
    assert stage
    os.kill(proc.pid, signal.SIGTERM)  # what systemd, a batch scheduler or `kill` sends
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in stage), "the stage process outlived its executor"
    status = load_status(directory)
    record = status.stages[0]
    assert status.phase == "Suspended" and record.state == "Pending"
    assert "SIGTERM" in record.message
    suspended = {c.type: c for c in status.conditions}["Suspended"]
    assert suspended.status == "True" and "SIGTERM" in suspended.message
    assert not marker(directory / "bridge", "dataset").exists()
    code, out = run(path, site)  # and it resumes
    assert code == 0, out


def test_a_stop_that_lands_as_a_stage_finishes_starts_no_other_stage(tmp_path, inputs, site):
    directory = run_dir(tmp_path)
    proc = spawn(manifest(tmp_path, inputs, sft=True), site)
    wait_for(lambda: marker(directory / "bridge", "dataset").exists(), proc, "the bridge committed", timeout=180)
    os.kill(proc.pid, signal.SIGINT)  # the executor alone: the stage is already done
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    status = load_status(directory)
    states = {s.name: s.state for s in status.stages}
    assert status.phase == "Suspended" and states["bridge"] == "Succeeded" and states["sft"] != "Succeeded"
    assert not marker(directory / "sft", "model").exists()


# --- finding 12: a failed re-run leaves no stale success ---------------------------------------


def test_a_failed_rerun_is_failed_only_and_keeps_no_old_artifact(tmp_path, inputs, site, capsys):
    directory = run_dir(tmp_path)
    code, out = run(manifest(tmp_path, inputs), site)
    assert code == 0, out
    shutil.rmtree(directory / "bridge")
    code, out = run(manifest(tmp_path, inputs, source=f"file://{tmp_path}/missing.jsonl"), site)
    assert code == 1, out
    status = load_status(directory)
    true = {c.type for c in status.conditions if c.status == "True"}
    assert status.phase == "Failed" and "Failed" in true and "Succeeded" not in true, status.conditions
    record = status.stages[0]
    assert record.state == "Failed" and record.artifact_uri is None and record.completion_time is None
    assert cli(["status", str(directory)]) == 1
    assert "AllStagesSucceeded" not in capsys.readouterr().out


# --- issue 15, item 5: the status tables --------------------------------------------------------


def test_status_table_names_the_run_and_shows_the_latest_stage_reward():
    status = VisionR1RunStatus(phase="Succeeded", stages=[
        StageStatus(name="sft", kind="sft", state="Succeeded", summary={"loss": 0.1}),
        StageStatus(name="ptst-1", kind="grpo", state="Succeeded", summary={"reward": 0.61}),
        StageStatus(name="ptst-2", kind="grpo", state="Succeeded", summary={"reward": 0.734}),
        StageStatus(name="eval", kind="eval", state="Succeeded", summary={"accuracy": 0.7}),
    ])
    console = Console(record=True, width=200)
    print_status(console, "tiny-cpu", status)
    head = console.export_text().splitlines()[1]
    assert head.split() == ["tiny-cpu", "Succeeded", "-", "0.734"]


def test_demo_prints_the_status_once_under_the_run_name(tmp_path, inputs, site, monkeypatch, capsys):
    from visionr1_operator import cli_local

    monkeypatch.setattr(cli_local, "DEMO_MANIFEST", manifest(tmp_path, inputs))
    monkeypatch.setattr(cli_local, "DEMO_INPUTS", inputs)  # already prepared: the demo reuses it
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["demo", "--metrics-port", "0"]) == 0
    out = capsys.readouterr().out
    heads = [line.split() for line in out.splitlines() if line.split()[:2] == ["NAME", "PHASE"]]
    assert len(heads) == 1, out
    assert any(line.split()[:2] == ["guard", "Succeeded"] for line in out.splitlines()), out


def test_each_stage_reads_the_stages_its_config_names():
    from visionr1_operator.local import inputs as provenance
    from visionr1_operator.manifest import load_run
    from visionr1_operator.plan import build_plan

    plans = build_plan(load_run(ROOT / "examples" / "tiny-cpu.yaml"))
    reads = {p.name: [u.name for u in provenance.upstream(p, plans)] for p in plans}
    ptst = [p.name for p in plans if p.kind == "grpo"]
    assert reads["bridge"] == [] and reads["sft"] == ["bridge"]
    for prev, name in zip(["sft", *ptst], ptst):  # the model it starts from (and the SFT one, its KL reference)
        assert reads[name][-1] == prev and set(reads[name]) <= {"sft", prev}
    assert reads["eval"] == ["sft", *ptst]  # every model it scores (the base model is no stage)
    before = provenance.Inputs({"sft": {"learningRate": 1e-3, "epochs": 2}, "dataUri": "x"}, {"bridge": "a1"})
    after = provenance.Inputs({"sft": {"learningRate": 2e-3, "epochs": 2}, "dataUri": "x"}, {"bridge": "b2"})
    assert provenance.changes(before, after) == ["sft.learningRate", "stage bridge was committed anew"]
    assert provenance.changes(before, before) == [] and before.digest() != after.digest()
