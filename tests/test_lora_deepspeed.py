"""LoRA under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo): SFT and GRPO stages with
adapters give the same per-step losses and the same committed (merged, plain) weights as
the same stages under plain torch (ZeRO-0) on the same ranks (issue 16, item 8). Under
ZeRO-3 the base loads partitioned and the adapters, injected after, are partitioned by
``deepspeed.initialize``; the merge reads the gathered state dict."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from grpo_harness import build_warm_model, write_color_task
from test_deepspeed_stages import assert_same_weights, final_weights, grpo_doc, run_plan, sft_doc, step_values

from visionr1_trainer.models import lora
from visionr1_trainer.metrics import read_jsonl

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.timeout(1800)  # six 2-rank stages and a model warm-up
LORA = {"enabled": True, "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
    from visionr1_trainer.models.tiny import build_tiny_vlm

    tmp = tmp_path_factory.mktemp("lora-zero")
    grpo_model, color = build_warm_model(tmp / "warm"), write_color_task(tmp / "color")
    sft_model = build_tiny_vlm(tmp / "tiny", corpus=tokenizer_corpus(per_task=2))
    synthetic = generate(tmp / "synthetic", 12, seed=1, n_eval=1)
    plan = []
    for stage in (0, 2, 3):
        doc = sft_doc(tmp, sft_model, synthetic.cold_start, stage, f"sft-lora-z{stage}")
        doc["sft"].update(lora=LORA, learningRate=1e-2)
        plan.append({"job": "stage", "name": f"sft-lora-z{stage}", "config": doc})
        plan.append({"job": "stage", "name": f"grpo-lora-z{stage}",
                     "config": grpo_doc(tmp, grpo_model, color, stage, f"grpo-lora-z{stage}", lora=LORA,
                                        learningRate=1e-2)})
    run_plan(plan, tmp / "out", timeout=1700)
    return tmp / "store" / "default" / "t", {"sft": sft_model, "grpo": grpo_model}


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_lora_under_zero_equals_plain_torch(runs, kind, zero):
    store, models = runs
    for key in ("loss", "grad_norm"):
        zeroed, torch0 = step_values(store, f"{kind}-lora-z{zero}", key), step_values(store, f"{kind}-lora-z0", key)
        assert zeroed == pytest.approx(torch0, rel=1e-4, abs=1e-6), key
    merged = final_weights(store, f"{kind}-lora-z{zero}")
    assert_same_weights(merged, final_weights(store, f"{kind}-lora-z0"), f"{kind} LoRA ZeRO-{zero}")
    start = read_jsonl(store / f"{kind}-lora-z{zero}" / "_work" / "metrics.jsonl", "start")[0]
    assert start["engine"] == "deepspeed" and start["zeroStage"] == zero
    assert start["trainableParameters"] == start["loraParameters"] > 0  # ZeRO-3: counted from ds_numel
    base = load_file(next(models[kind].glob("*.safetensors")))
    assert set(merged) == set(base) and not any(lora.is_adapter_key(k) for k in merged)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj") and "visual" not in k for k in changed)
