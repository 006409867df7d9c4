"""LoRA (issue 16, item 8): adapters through peft, merged into the committed model.

Unit tests on the tiny Qwen2.5-VL against independent computations (the merge by hand
from the adapter's tensors and peft's own ``merge``), then whole SFT and GRPO stages with
LoRA on CPU: only the adapters train, the committed model is a plain model without peft
keys that the ordinary loader reads, and it differs from the start by a low-rank update.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from visionr1_trainer.config import GRPOSettings, GRPOStageConfig, LoraSettings, SFTSettings, SFTStageConfig
from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.grpo.engine import EngineSpec, TorchEngine
from visionr1_trainer.grpo.logprob_head import LogprobModel
from visionr1_trainer.metrics import read_jsonl
from visionr1_trainer.models import lora
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.tiny import build_tiny_vlm
from visionr1_trainer.runtime import StageStopped, UnusableSetting, reset_stop

pytestmark = pytest.mark.timeout(1800)
CPU = DistEnv(0, 1, 0, "cpu", None)
SETTINGS = LoraSettings(enabled=True, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", corpus=tokenizer_corpus(per_task=2))


def adapted(model_dir, settings=SETTINGS, seed=0):
    model, tokenizer, processor = load_vlm(str(model_dir), "float32", "sdpa", "cpu")
    lora.apply_lora(model, settings)
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero (peft's init): give it values so the merge is not trivial
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
    return model, tokenizer, processor


def inputs_of(tokenizer):
    ids = tokenizer(["Final Answer: 3", "what is two plus"], return_tensors="pt", padding=True).input_ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --- settings ---------------------------------------------------------------------------------


def test_lora_is_off_by_default_and_bad_values_name_the_field():
    assert not SFTSettings().lora.enabled and not GRPOSettings().lora.enabled
    for settings in (SFTSettings, GRPOSettings):  # every ZeRO stage (tests/test_lora_deepspeed.py)
        assert settings.model_validate({"lora": {"enabled": True}}).deepspeed_zero_stage == 3
        with pytest.raises(ValidationError, match="lora.alpha"):
            settings.model_validate({"lora": {"enabled": True, "alpha": 0}})
    with pytest.raises(ValidationError, match="rank"):
        LoraSettings.model_validate({"enabled": True, "rank": 0})
    with pytest.raises(ValidationError, match="targetModules"):
        LoraSettings.model_validate({"targetModules": []})


def test_unknown_target_modules_name_the_field(tiny_model):
    model, _, _ = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    with pytest.raises(UnusableSetting, match="sft.lora.targetModules"):
        lora.apply_lora(model, LoraSettings(enabled=True, targetModules=["nope"]), field="sft.lora")


# --- the helpers against independent computations ---------------------------------------------


def test_only_language_model_adapters_train_and_the_count_is_the_adapters(tiny_model):
    model, _, _ = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n in linears if n.split(".")[-1] in SETTINGS.target_modules and "visual" not in n]
    assert targets and any("visual" in n and n.endswith("gate_proj") for n in linears)  # the vision MLP is spared
    expected = sum(SETTINGS.rank * (linears[n].in_features + linears[n].out_features) for n in targets)
    counts = lora.apply_lora(model, SETTINGS)
    assert counts["trainable"] == counts["adapter"] == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}


def test_merged_weights_are_w_plus_scaled_b_a_and_equal_peft_merge(tiny_model):
    model, tokenizer, _ = adapted(tiny_model)
    state = model.state_dict()
    scaling = lora.lora_scaling(model)
    assert set(scaling.values()) == {SETTINGS.alpha / SETTINGS.rank}
    merged = lora.merged_state_dict(state, scaling)
    plain, _, _ = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    assert set(merged) == set(plain.state_dict())  # no peft keys, every plain key
    for module in scaling:  # by hand, from the adapter's tensors
        w = state[f"{module}.base_layer.weight"]
        a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
        assert torch.allclose(merged[f"{module}.weight"], w + 2.0 * b @ a, atol=1e-6)
        assert not torch.equal(merged[f"{module}.weight"], w)
    reference = copy.deepcopy(model)  # peft's own merge of the same layers
    for name, layer in reference.named_modules():
        if name in scaling:
            layer.merge()
    peft_state = reference.state_dict()
    for module in scaling:
        assert torch.allclose(merged[f"{module}.weight"], peft_state[f"{module}.base_layer.weight"], atol=1e-6)
    # The plain model with the merged weights computes what the adapted one does.
    plain.load_state_dict(merged, strict=True)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs_of(tokenizer)).logits, plain(**inputs_of(tokenizer)).logits, atol=1e-5)
    # The streamed merge (vLLM's weight sync) gives the same tensors under the same names.
    streamed = dict(lora.merged_parameters(model.named_parameters(), scaling))
    params = dict(plain.named_parameters())
    assert set(streamed) == set(params)
    assert all(torch.allclose(streamed[k], merged[k], atol=0) for k in streamed)


def test_a_step_moves_only_the_adapters_and_the_base_stays_bit_identical(tiny_model):
    model, tokenizer, _ = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    lora.apply_lora(model, SETTINGS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TorchEngine(LogprobModel(model), CPU, EngineSpec(0, "fp32", 2, 1.0, 1e-2, weight_decay=0.1))
    inputs = inputs_of(tokenizer)
    for _ in range(3):
        engine.zero_grad()
        logprobs, _ = engine(targets=inputs["input_ids"][:, 1:], **inputs)
        logprobs.sum().neg().backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(lora.is_adapter_key(n) for n in grads)
        engine.step()
    after = model.state_dict()
    for key, value in before.items():
        if lora.is_adapter_key(key) and ".lora_B." in key:
            assert not torch.equal(after[key], value), key  # B left zero: trained
        elif not lora.is_adapter_key(key):
            assert torch.equal(after[key], value), key  # frozen base: bit-identical until merge
    assert engine.describe()["trainableParameters"] == engine.describe()["loraParameters"] > 0


# --- whole stages -----------------------------------------------------------------------------


def low_rank_update(base: dict, final: dict, rank: int) -> list[str]:
    """Checks the committed model against its start; returns the keys that changed."""
    assert set(final) == set(base) and not any(lora.is_adapter_key(k) or ".base_layer." in k for k in final)
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert changed
    for key in changed:  # only targeted language-model weights, each by a matrix of rank <= r
        parts = key.split(".")
        assert parts[-1] == "weight" and parts[-2] in SETTINGS.target_modules and "visual" not in parts, key
        assert torch.linalg.matrix_rank((final[key] - base[key]).double(), atol=1e-6) <= rank, key
    return changed


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), 12, seed=1, n_eval=1)


def sft_config(out, model, data, **sft):
    return SFTStageConfig.model_validate({
        "run": "demo", "stage": "sft", "outputUri": f"file://{out}", "storage": {"uri": f"file://{out.parent}"},
        "model": {"name": f"file://{model}", "dtype": "float32"}, "metricsPort": 0, "data": {"source": str(data)},
        "sft": {"epochs": 2, "learningRate": 1e-2, "cutoffLength": 256, "perDeviceBatchSize": 4,
                "gradientAccumulationSteps": 2, "precision": "fp32", "deepspeedZeroStage": 0,
                "saveEverySteps": 2, "lora": {"enabled": True, "rank": 4, "alpha": 8}, **sft},
    })


def test_sft_with_lora_commits_a_plain_low_rank_updated_model_and_resumes_exactly(tiny_model, synthetic, tmp_path,
                                                                                  monkeypatch):
    from visionr1_trainer.sft import train

    straight = tmp_path / "straight"
    summary = train.run(sft_config(straight, tiny_model, synthetic.cold_start))
    assert summary["step"] == 4
    start = read_jsonl(straight / "_work" / "metrics.jsonl", "start")
    assert start and start[0]["trainableParameters"] == start[0]["loraParameters"] > 0
    base = load_file(next(tiny_model.glob("*.safetensors")))
    final = load_file(next((straight / "model").glob("*.safetensors")))
    low_rank_update(base, final, SETTINGS.rank)
    model, _, _ = load_vlm(str(straight / "model"), "float32", "sdpa", "cpu")  # the ordinary loader
    loaded = dict(model.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"]
    saved = next(v for k, v in final.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(loaded, saved)
    assert (straight / "checkpoints" / "step-00000004" / lora.ADAPTER_FILE).is_file()
    # Killed after the step-2 checkpoint, resumed: the same committed weights as unbroken.
    resumed = tmp_path / "resumed"
    checks = iter([False, False, False, True])
    monkeypatch.setattr(train, "stop_requested", lambda: next(checks, False))
    with pytest.raises(StageStopped):
        train.run(sft_config(resumed, tiny_model, synthetic.cold_start))
    monkeypatch.setattr(train, "stop_requested", lambda: False)
    assert train.run(sft_config(resumed, tiny_model, synthetic.cold_start))["step"] == 4
    again = load_file(next((resumed / "model").glob("*.safetensors")))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_grpo_with_lora_trains_the_adapters_only_commits_a_plain_model_and_resumes_exactly(tmp_path, monkeypatch):
    from grpo_harness import build_warm_model, grpo_config, write_color_task

    from visionr1_trainer.grpo import trainer

    reset_stop()
    model_dir = build_warm_model(tmp_path / "model")
    data = write_color_task(tmp_path / "data")

    def config(root):
        doc = grpo_config(root, model_dir, data, steps=3, learningRate=1e-2, saveEverySteps=2,
                          lora={"enabled": True, "rank": 4, "alpha": 8})
        return GRPOStageConfig.model_validate(doc, by_name=False)

    summary = trainer.run(config(tmp_path / "straight"))
    out = tmp_path / "straight" / "store" / "default" / "t" / "ptst-1"
    assert summary["artifactUri"] == f"file://{out}/model"
    records = read_jsonl(out / "_work" / "metrics.jsonl", None)
    start = [r for r in records if r.get("type") == "start"]
    assert start and start[0]["trainableParameters"] == start[0]["loraParameters"] > 0
    steps = [r for r in records if r.get("type") == "step"]
    assert len(steps) == 3 and any(s["grad_norm"] > 0 for s in steps)
    base = load_file(next(model_dir.glob("*.safetensors")))
    final = load_file(next((out / "model").glob("*.safetensors")))
    low_rank_update(base, final, SETTINGS.rank)
    load_vlm(str(out / "model"), "float32", "sdpa", "cpu")  # the ordinary loader
    json.loads((out / "summary.json").read_text())
    # Stopped before step 3 (after the step-2 checkpoint), resumed: the unbroken stage's weights.
    checks = iter([False, False, True])
    monkeypatch.setattr(trainer, "stop_requested", lambda: next(checks, False))
    with pytest.raises(StageStopped):
        trainer.run(config(tmp_path / "resumed"))
    monkeypatch.setattr(trainer, "stop_requested", lambda: False)
    trainer.run(config(tmp_path / "resumed"))
    again = load_file(next((tmp_path / "resumed" / "store" / "default" / "t" / "ptst-1" / "model").glob("*.safetensors")))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_a_stage_whose_target_modules_match_nothing_stops_naming_the_field(tiny_model, synthetic, tmp_path):
    from visionr1_trainer.sft import train

    with pytest.raises(UnusableSetting, match="sft.lora.targetModules"):  # the entrypoint exits 2 on it
        train.run(sft_config(tmp_path / "sft", tiny_model, synthetic.cold_start,
                             lora={"enabled": True, "targetModules": ["qkv_nope"]}))


def test_sft_with_lora_and_an_unfrozen_vision_tower_trains_both(tiny_model, synthetic, tmp_path):
    """freezeVisionTower: false beside LoRA: the tower trains fully, the language model
    through its adapters only (peft freezes everything else; the setting is not dropped)."""
    from visionr1_trainer.sft import train

    out = tmp_path / "sft"
    train.run(sft_config(out, tiny_model, synthetic.cold_start, epochs=1, freezeVisionTower=False))
    model, _, _ = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    tower = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}" and ".merger." not in n)
    start = read_jsonl(out / "_work" / "metrics.jsonl", "start")[0]
    assert start["trainableParameters"] == start["loraParameters"] + tower
    base = load_file(next(tiny_model.glob("*.safetensors")))
    final = load_file(next((out / "model").glob("*.safetensors")))
    changed = {k for k in base if not torch.equal(base[k], final[k])}
    assert any("visual" in k and "merger" not in k for k in changed)  # the tower moved
    assert not any("merger" in k for k in changed)  # the projector kept frozen
    language = {k: final[k] for k in changed if "visual" not in k}
    assert language and all(k.split(".")[-2] in SETTINGS.target_modules for k in language)
