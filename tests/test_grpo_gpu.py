"""GPU paths of the GRPO engine (`make gpu-smoke`): vLLM rollouts with weight refresh, NCCL."""

from __future__ import annotations

import json

import pytest

from grpo_harness import build_warm_model, grpo_config, write_color_task

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-assets")
    return build_warm_model(base / "model"), write_color_task(base / "data")


def test_vllm_rollouts_train_and_commit(tmp_path, assets):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    assert torch.cuda.is_available()
    from visionr1_trainer.config import GRPOStageConfig
    from visionr1_trainer.grpo.trainer import run

    doc = grpo_config(tmp_path, *assets, steps=3, rolloutBackend="vllm")
    summary = run(GRPOStageConfig.model_validate(doc))
    assert summary["step"] == 3 and summary["artifactUri"].endswith("/model")
    log = (tmp_path / "store/default/t/ptst-1/_work/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in log if '"type": "step"' in line]
    assert len(steps) == 3 and all(s["rollout_tokens_per_s"] > 0 for s in steps)


def test_vllm_weights_follow_the_policy_after_sync(tmp_path, assets):
    """After sync_weights, vLLM samples greedily what the HF policy decodes greedily."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from visionr1_trainer.config import GRPOStageConfig
    from visionr1_trainer.distributed import DistEnv
    from visionr1_trainer.grpo.engine import EngineSpec, TorchEngine
    from visionr1_trainer.grpo.rollout import HFRollout, SamplingSettings
    from visionr1_trainer.grpo.vllm_rollout import VLLMRollout
    from visionr1_trainer.models.loading import load_vlm
    from visionr1_trainer.models.vlm import encode_prompts
    from PIL import Image

    cfg = GRPOStageConfig.model_validate(grpo_config(tmp_path, *assets))
    model, tok, ip = load_vlm(str(assets[0]), "float32", device="cuda:0")
    env = DistEnv(0, 1, 0, "cuda:0", None)
    engine = TorchEngine(model, env, EngineSpec(0, "fp32", 8, 1.0, 1e-3))
    with torch.no_grad():  # move the policy away from the weights vLLM loaded
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vllm = VLLMRollout(model, tok, env, cfg)
    vllm.sync_weights(engine)
    enc = encode_prompts(tok, ip, ["What color is the image?"], [[Image.new("RGB", (56, 56), "red")]], 64)
    greedy = SamplingSettings(1, 16, temperature=0.0)
    ours = vllm.generate(enc, [1], greedy).completion_ids[0].tolist()
    theirs = HFRollout(engine, tok).generate(enc, [1], SamplingSettings(1, 16, temperature=1e-5)).completion_ids[0].tolist()
    assert ours[:8] == theirs[:8]
