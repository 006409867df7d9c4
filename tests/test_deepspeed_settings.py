"""Engine settings that need no second rank: bf16 master weights, exit 2 where DeepSpeed
cannot run, the PTST warmup, batch sizes that must split over the ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionr1_trainer.config import GRPOSettings, activation_checkpointing_on
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.grpo.engine import EngineSpec, TorchEngine
from visionr1_trainer.grpo.trainer import ptst_learning_rate

from grpo_harness import grpo_config

ROOT = Path(__file__).resolve().parents[1]
CPU = DistEnv(0, 1, 0, "cpu", None)


def trained_delta(dtype: torch.dtype, steps: int = 20, lr: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights the optimizer holds after ``steps`` AdamW steps) - (start), for a small MLP."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(dtype)
    start = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    engine = TorchEngine(model, CPU, EngineSpec(0, "bf16" if dtype == torch.bfloat16 else "fp32", 16, 1.0, lr))
    data = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        engine.zero_grad()
        engine.backward(engine(input=data.to(dtype)).float().pow(2).mean())
        engine.step()
    held = engine._masters if engine._masters is not None else list(model.parameters())
    return torch.cat([p.detach().float().flatten() for p in held]) - start, start


def test_bf16_at_lr_1e6_moves_the_weights_as_fp32_does():
    """Plain AdamW on bf16 weights changed 1.9% of them at lr 1e-6 over 20 steps: updates
    below bf16's spacing round away. The fp32 masters take every update."""
    fp32, _ = trained_delta(torch.float32)
    bf16, _ = trained_delta(torch.bfloat16)
    assert (fp32 != 0).float().mean() > 0.99
    assert (bf16 != 0).float().mean() > 0.99
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)
    assert cosine > 0.95 and 0.8 < bf16.norm() / fp32.norm() < 1.25, (float(cosine), float(bf16.norm() / fp32.norm()))


def test_a_zero_stage_where_deepspeed_cannot_run_exits_2_naming_the_field(tmp_path):
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no DeepSpeed on this machine')\n")
    doc = grpo_config(tmp_path, tmp_path / "no-model", tmp_path / "no-data.jsonl", deepspeedZeroStage=3)
    doc["model"]["name"] = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    # A saved model directory is enough to reach the engine: the stage fails at DeepSpeed.
    from visionr1_trainer.models.tiny import build_tiny_vlm

    build_tiny_vlm(tmp_path / "model")
    cfg = tmp_path / "stage.json"
    cfg.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "-m", "visionr1_trainer", "grpo", "--config", str(cfg)], cwd=ROOT,
                         env={"PYTHONPATH": str(tmp_path / "fake"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "grpo.deepspeedZeroStage: ZeRO stage 3 needs DeepSpeed" in out.stderr
    assert "no DeepSpeed on this machine" in out.stderr and "Traceback" not in out.stderr


def test_ptst_warmup_rises_linearly_then_holds_the_paper_rate():
    assert [ptst_learning_rate(s, 1e-6, 4) for s in range(6)] == pytest.approx(
        [0.25e-6, 0.5e-6, 0.75e-6, 1e-6, 1e-6, 1e-6])
    assert ptst_learning_rate(0, 1e-6, 0) == 1e-6
    assert GRPOSettings().warmup_steps == 5


def test_batches_that_do_not_split_over_the_ranks_are_refused_naming_the_field():
    settings = GRPOSettings.model_validate({"rolloutBatchSize": 6, "miniBatchSize": 3})
    assert settings.rank_split_problems(2) == [("miniBatchSize", "3 prompts do not split evenly over 2 ranks")]
    assert [field for field, _ in settings.rank_split_problems(4)] == ["rolloutBatchSize", "miniBatchSize"]
    assert GRPOSettings().rank_split_problems(8) == []


def test_activation_checkpointing_is_on_at_the_papers_lengths_only():
    assert activation_checkpointing_on("auto", 16384) and activation_checkpointing_on("auto", 4096 + 4096)
    assert not activation_checkpointing_on("auto", 64 + 24)  # the tiny CPU demo stays fast
    assert activation_checkpointing_on("on", 10) and not activation_checkpointing_on("off", 1 << 20)
    assert GRPOSettings().collective_timeout_minutes == 60
