"""A ZeRO-3 GRPO stage on 2 CPU ranks, killed mid-stage and resumed, ends where an unbroken
run ends (issue 12 finding 10): each rank's optimizer partition (Adam moments, fp32
masters) and its own RNG come back from the checkpoint. Before, the moments restarted
and every rank restored rank 0's RNG, so the resumed run sampled other completions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionr1_trainer.metrics import read_jsonl

from grpo_harness import build_warm_model, free_port, grpo_config, write_color_task
from test_deepspeed_stages import torchrun_env

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


def stage_process(cfg_path: Path, log: Path) -> subprocess.Popen:
    """Both ranks of the stage; output to a file (a pipe nobody reads would fill and block them)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "visionr1_trainer", "grpo", "--config", str(cfg_path)],
        cwd=ROOT, env=torchrun_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches both ranks
    )


def finish(proc: subprocess.Popen, log: Path) -> None:
    lines = lambda: [line for line in log.read_text().splitlines() if "Warning" not in line and "return func" not in line]
    assert proc.wait(timeout=300) == 0, "\n".join(lines()[-60:])


def write_config(tmp: Path, model: Path, data: Path, name: str) -> Path:
    doc = grpo_config(tmp, model, data, stage=name, steps=6, saveEverySteps=2, rolloutBatchSize=4,
                      microBatchSize=4, deepspeedZeroStage=3, warmupSteps=2, collectiveTimeoutMinutes=3)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted((out / "model").glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_zero3_grpo_killed_and_resumed_ends_with_the_unbroken_weights(tmp_path):
    model, data = build_warm_model(tmp_path / "warm"), write_color_task(tmp_path / "color")
    store = tmp_path / "store" / "default" / "t"

    log = tmp_path / "stage.log"
    finish(stage_process(write_config(tmp_path, model, data, "whole"), log), log)

    cfg = write_config(tmp_path, model, data, "killed")
    killed = stage_process(cfg, log)
    marker = store / "killed" / "checkpoints" / "step-00000002" / "_COMMITTED.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert killed.poll() is None, f"stage exited early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (store / "killed" / "model" / "_COMMITTED.json").exists(), "finished before the kill"
    # every rank's shard was committed with the checkpoint
    assert (store / "killed" / "shards" / "step-00000002" / "rank-00001" / "_COMMITTED.json").exists()

    finish(stage_process(cfg, log), log)
    log = store / "killed" / "_work" / "metrics.jsonl"
    starts = read_jsonl(log, kind="start")
    assert starts[-1]["resumed"] is True and starts[-1]["step"] >= 2 and starts[-1]["zeroStage"] == 3
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5, 6]

    whole, again = weights(store / "whole"), weights(store / "killed")
    assert whole.keys() == again.keys()
    for key in whole:
        assert torch.allclose(whole[key], again[key], rtol=1e-5, atol=1e-6), \
            f"{key} differs by {(whole[key] - again[key]).abs().max()}"
    rewards = [r["reward_mean"] for r in read_jsonl(store / "whole" / "_work" / "metrics.jsonl")]
    assert rewards == [r["reward_mean"] for r in read_jsonl(log)]  # the same completions were sampled
