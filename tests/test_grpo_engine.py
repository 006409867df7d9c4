"""The GRPO/PTST engine on a tiny Qwen2.5-VL on CPU: chaining, resume, metrics, learning, gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from visionr1_trainer.config import GRPOStageConfig
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.grpo.trainer import batch_indices, load_models, rank_share
from visionr1_trainer.grpo.trainer import run as run_grpo
from visionr1_trainer.metrics import read_jsonl
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.runtime import reset_stop

from grpo_harness import build_warm_model, free_port, grpo_config, write_color_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A warmed-up tiny model and the colour task, built once for the module."""
    base = tmp_path_factory.mktemp("grpo-assets")
    return build_warm_model(base / "model"), write_color_task(base / "data")


def config(tmp_path, assets, **kw) -> GRPOStageConfig:
    model, data = assets
    return GRPOStageConfig.model_validate(grpo_config(tmp_path, model, data, **kw), by_name=False)


def stage_dir(tmp_path, stage="ptst-1") -> Path:
    return tmp_path / "store" / "default" / "t" / stage


def test_two_ptst_stages_chain_through_committed_checkpoints(tmp_path, assets):
    first = config(tmp_path, assets, steps=3, saveEverySteps=2)
    summary = run_grpo(first)
    out = stage_dir(tmp_path)
    assert summary["step"] == 3 and summary["artifactUri"] == f"{first.output_uri}/model"
    assert (out / "model" / "_COMMITTED.json").exists()
    # a checkpoint every 2 steps and at the end; only the newest two are kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "_COMMITTED.json").exists()) == [
        "step-00000002", "step-00000003",
    ]
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    records = read_jsonl(out / "_work" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "format_rate", "accuracy", "zero_std_groups",
                "completion_length_mean", "completion_length_max", "completion_length_min", "clipped_ratio",
                "kl", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm", "learning_rate",
                "rollout_tokens_per_s", "train_tokens_per_s", "step_seconds"):
        assert key in records[0], key

    # PTST stage 2: 8 tokens longer budget, half the samples, starting from stage 1's model.
    second = config(tmp_path, assets, stage="ptst-2", index=2, init_uri=first.output_uri, steps=1)
    second = second.model_copy(update={"ptst": second.ptst.model_copy(update={"max_completion_length": 48, "num_generations": 2})})
    source, policy, reference, _, _, _ = load_models(second, DistEnv(0, 1, 0, "cpu", None), tmp_path / "w")
    assert source == str(out / "model")
    trained, _, _ = load_vlm(str(out / "model"), "float32")  # from_pretrained into a plain HF model
    weights = policy.full_state_dict()
    assert list(weights) == list(trained.state_dict())  # the Hugging Face names, wrapper or not
    assert [n for n, _ in policy.iter_full_parameters()] == [n for n, _ in trained.named_parameters()]
    for (name, a), b in zip(weights.items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    assert reference is not None and not any(p.requires_grad for p in reference._module.parameters())
    summary2 = run_grpo(second)
    assert summary2["step"] == 1 and (stage_dir(tmp_path, "ptst-2") / "model" / "_COMMITTED.json").exists()
    start = read_jsonl(stage_dir(tmp_path, "ptst-2") / "_work" / "metrics.jsonl", kind="start")[0]
    assert start["init"] == str(out / "model") and start["resumed"] is False


def test_grpo_raises_mean_reward_on_a_learnable_task(tmp_path, assets):
    """What shows the engine optimises at all: a seeded run's reward climbs well above its start."""
    cfg = config(tmp_path, assets, steps=36, saveEverySteps=100, rolloutBatchSize=16, seed=3, learningRate=2e-3)
    cfg = cfg.model_copy(update={"ptst": cfg.ptst.model_copy(update={"num_generations": 8})})
    run_grpo(cfg)
    rewards = [r["reward_mean"] for r in read_jsonl(stage_dir(tmp_path) / "_work" / "metrics.jsonl")]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last >= first + 0.25, f"mean reward {first:.3f} -> {last:.3f}: {rewards}"


def _stage_process(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "visionr1_trainer", "grpo", "--config", str(cfg_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"stage exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out")


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return text if "visionr1_reward_mean{" in text else None


def test_killed_stage_resumes_at_its_last_checkpoint_and_serves_metrics(tmp_path, assets):
    port = free_port()
    doc = grpo_config(tmp_path, *assets, steps=6, saveEverySteps=2)
    doc["metricsPort"] = port
    cfg_path = tmp_path / "stage.json"
    cfg_path.write_text(json.dumps(doc))
    checkpoints = stage_dir(tmp_path) / "checkpoints"

    proc = _stage_process(cfg_path)
    metrics_text = _wait_for(lambda: _scrape(port), proc)
    for series in ("visionr1_step", "visionr1_total_steps", "visionr1_reward_mean",
                   "visionr1_completion_length_mean", "visionr1_kl", "visionr1_format_rate"):
        assert f'{series}{{run="t",stage="ptst-1"}}' in metrics_text, series
    _wait_for(lambda: (checkpoints / "step-00000002" / "_COMMITTED.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (stage_dir(tmp_path) / "model" / "_COMMITTED.json").exists()
    committed = sorted(p.name for p in checkpoints.iterdir() if (p / "_COMMITTED.json").exists())
    resume_step = int(committed[-1].split("-")[1])

    proc = _stage_process(cfg_path)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    log = stage_dir(tmp_path) / "_work" / "metrics.jsonl"
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    starts = read_jsonl(log, kind="start")
    assert starts[-1]["resumed"] is True and starts[-1]["step"] == resume_step
    summary = json.loads((tmp_path / "ptst-1.termination").read_text())
    assert summary["step"] == 6 and summary["artifactUri"].endswith("/ptst-1/model")


def test_sigterm_commits_a_checkpoint_and_exits_143(tmp_path, assets):
    doc = grpo_config(tmp_path, *assets, steps=50, saveEverySteps=100)
    cfg_path = tmp_path / "stage.json"
    cfg_path.write_text(json.dumps(doc))
    log = stage_dir(tmp_path) / "_work" / "metrics.jsonl"
    proc = _stage_process(cfg_path)
    _wait_for(lambda: log.exists() and read_jsonl(log), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    done = len(read_jsonl(log))
    assert (stage_dir(tmp_path) / "checkpoints" / f"step-{done:08d}" / "_COMMITTED.json").exists()
    summary = json.loads((tmp_path / "ptst-1.termination").read_text())
    assert summary["stopped"] is True and summary["step"] == done


def test_bad_stage_config_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "stage.json"
    cfg.write_text(json.dumps({"kind": "grpo", "run": "t"}))
    out = subprocess.run([sys.executable, "-m", "visionr1_trainer", "grpo", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "outputUri: required field is missing" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "visionr1_trainer", "sft", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "expected 'sft'" in out.stderr


# --- two ranks over gloo -------------------------------------------------------------------


def test_two_gloo_ranks_stay_identical(tmp_path, assets):
    doc = grpo_config(tmp_path, *assets, steps=3, saveEverySteps=100)
    doc["outputUri"] = f"file://{tmp_path}/store/default/t/ptst-1"
    port = free_port()
    env = {**os.environ, "VISIONR1_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cfg_path = tmp_path / "stage.json"
    cfg_path.write_text(json.dumps(doc))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "visionr1_trainer", "grpo", "--config", str(cfg_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The stage compares every parameter's fingerprint across ranks at the end and
    # fails on any difference; rank 0 logs the result.
    (replicas,) = read_jsonl(stage_dir(tmp_path) / "_work" / "metrics.jsonl", kind="replicas")
    assert replicas == {**replicas, "world_size": 2, "identical": True}
    # ... and they trained: the committed weights moved away from the starting model.
    start, _, _ = load_vlm(str(assets[0]), "float32")
    final, _, _ = load_vlm(str(stage_dir(tmp_path) / "model"), "float32")
    moved = [n for (n, a), b in zip(start.state_dict().items(), final.state_dict().values()) if not torch.equal(a, b)]
    assert moved
    # both ranks sampled different prompts: rank 0's share and rank 1's are disjoint
    idx = batch_indices(0, 32, 8, 42)
    env0, env1 = DistEnv(0, 2, 0, "cpu", "gloo"), DistEnv(1, 2, 1, "cpu", "gloo")
    assert set(rank_share(idx, env0)).isdisjoint(rank_share(idx, env1))


@pytest.fixture(autouse=True)
def _clear_stop_flag():
    reset_stop()
    yield
    reset_stop()
