"""A multi-GPU stage's pod command, run for real: an unusable config exits 2 (issue 14, item 3).

torchrun reports a worker's failure as its own exit 1, so "exit 2: the config is unusable,
do not retry" never reached the Job's podFailurePolicy. The pod command built by
``pods.trainer_command`` checks the config before torchrun starts any worker. Here the
exact command (``python`` and ``torchrun`` resolved to this environment's, the config path
to a local file) runs on CPU with two workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import run_manifest

from visionr1_operator.cluster.controller import parse_run
from visionr1_operator.cluster.naming import CONFIG_DIR, CONFIG_KEY
from visionr1_operator.cluster.pods import trainer_command
from visionr1_operator.plan import build_plan

TORCHRUN = Path(sys.executable).parent / "torchrun"


def stage_plan(kind: str, gpus: int):
    """The first plan of a stage kind (``sft``, ``grpo``: PTST stage 1) on ``gpus`` GPUs."""
    doc = run_manifest("launch")
    doc["spec"]["stages"][kind]["resources"] = {"gpusPerNode": gpus}
    run, problems = parse_run(doc)
    assert run is not None, problems
    return next(p for p in build_plan(run, "visionr1/trainer:test") if p.kind == kind)


def sft_plan(gpus: int):
    return stage_plan("sft", gpus)


def local(command: list[str], config: Path) -> list[str]:
    """The pod's command with this machine's python and torchrun and a local config file."""
    where = {"python": sys.executable, "torchrun": str(TORCHRUN)}
    return [where.get(arg, arg.replace(f"{CONFIG_DIR}/{CONFIG_KEY}", str(config))) for arg in command]


def run_pod_command(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "VISIONR1_WORK_DIR": str(tmp_path / "work")}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_a_bad_config_exits_2_under_torchrun_before_any_worker_starts(tmp_path):
    plan = sft_plan(gpus=2)
    command = trainer_command(plan)
    assert "torchrun" in command and "--nproc-per-node=2" in command
    termination = tmp_path / "termination-log"
    config = tmp_path / "stage.json"
    good = plan.config_json()
    bad = {**good, "learningRate": "fast", "terminationMessagePath": str(termination)}
    config.write_text(json.dumps(bad))
    done = run_pod_command(local(command, config), tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "error: bad config" in done.stderr
    assert "ChildFailedError" not in done.stderr  # torchrun never started (its report of a failed worker)
    summary = json.loads(termination.read_text())
    assert summary["stage"] == "sft" and summary["error"].startswith("bad config") and "learningRate" in summary["error"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_torchrun_itself_turns_a_workers_exit_2_into_1(tmp_path):
    """Why the check exists: the same bad config given to torchrun directly ends with 1."""
    plan = sft_plan(gpus=2)
    command = trainer_command(plan)
    direct = command[command.index("torchrun"):]
    config = tmp_path / "stage.json"
    config.write_text(json.dumps({**plan.config_json(), "learningRate": "fast",
                                  "terminationMessagePath": str(tmp_path / "termination-log")}))
    done = run_pod_command(local(direct, config), tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "ChildFailedError" in done.stderr and "exitcode  : 2" in done.stderr, done.stderr[-2000:]


def test_a_valid_config_runs_the_command_unchanged(tmp_path):
    """A config that validates: the launcher runs the command (its exit status is the pod's)."""
    plan = sft_plan(gpus=2)
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(plan.config_json()))
    probe = [sys.executable, "-c", "import os, sys; print(os.getpid()); sys.exit(7)"]
    done = run_pod_command([sys.executable, "-m", "visionr1_trainer.launch", "sft", "--config", str(config),
                            "--", *probe], tmp_path)
    assert done.returncode == 7, done.stderr[-2000:]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_a_setting_a_worker_finds_unusable_still_exits_2_under_torchrun(tmp_path):
    """A config that validates but names what cannot run (a reward plug-in that does not
    import, found by each worker at stage start): torchrun alone ends with 1 (retried on the
    full allocation); the pod command ends with 2 and the reason, naming the field."""
    plan = stage_plan("grpo", gpus=2)
    command = trainer_command(plan)
    assert "torchrun" in command and "--nproc-per-node=2" in command
    termination = tmp_path / "termination-log"
    config = tmp_path / "stage.json"
    config.write_text(json.dumps({**plan.config_json(), "terminationMessagePath": str(termination),
                                  "metricsPort": 0,
                                  "grpo": {**plan.config_json()["grpo"], "reward": "no_such_module_vr1:score"}}))
    done = run_pod_command(local(command, config), tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    summary = json.loads(termination.read_text())
    assert "grpo.reward" in summary["error"] and "no_such_module_vr1" in summary["error"], summary


def launch_probe(tmp_path: Path, code: str) -> subprocess.Popen:
    plan = sft_plan(gpus=2)
    config = tmp_path / "stage.json"
    config.write_text(json.dumps({**plan.config_json(), "terminationMessagePath": str(tmp_path / "termination-log")}))
    return subprocess.Popen([sys.executable, "-m", "visionr1_trainer.launch", "sft", "--config", str(config),
                             "--", sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)


def test_sigterm_to_the_launcher_reaches_the_command(tmp_path):
    """Kubernetes stops a pod with SIGTERM to its first process: torchrun (and through it the
    workers) must get it, and their exit status must be the pod's."""
    import signal

    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    launcher = launch_probe(tmp_path, code)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 143
    finally:
        launcher.kill()
    assert not (tmp_path / "termination-log").exists()  # an ordinary stop is not "unusable"


def test_a_command_killed_by_a_signal_exits_128_plus_it(tmp_path):
    launcher = launch_probe(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert launcher.wait(timeout=30) == 137
