"""SFT on the tiny Qwen2.5-VL: the loss, checkpoints, resume, the committed model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from visionr1_trainer.bridge import pipeline as bridge_pipeline
from visionr1_trainer.config import BridgeStageConfig, SFTStageConfig
from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.vlm import IMAGE_TOKEN
from visionr1_trainer.grpo.engine import make_engine
from visionr1_trainer.grpo.logprob_head import LogprobModel
from visionr1_trainer.runtime import StageStopped, UnusableSetting
from visionr1_trainer.sft import train
from visionr1_trainer.sft.batches import collate, load_group
from visionr1_trainer.sft.data import IGNORE_INDEX, build_training_data

CPU = DistEnv(0, 1, 0, "cpu", None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from visionr1_trainer.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", corpus=tokenizer_corpus(per_task=2))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), 12, seed=1, n_eval=1)


def sft_config(out, model, data: dict, **sft) -> SFTStageConfig:
    return SFTStageConfig.model_validate({
        "run": "demo", "stage": "sft", "outputUri": f"file://{out}", "storage": {"uri": f"file://{out.parent}"},
        "model": {"name": f"file://{model}", "dtype": "float32"}, "metricsPort": 0, **data,
        "sft": {"epochs": 2, "learningRate": 1e-3, "cutoffLength": 256, "perDeviceBatchSize": 4,
                "gradientAccumulationSteps": 2, "precision": "fp32", "deepspeedZeroStage": 0,
                "saveEverySteps": 2, **sft},
    })


def test_token_loss_sum_counts_only_labelled_next_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX]])
    expected = (F.cross_entropy(logits[0, 0:1], labels[0, 1:2], reduction="sum")
                + F.cross_entropy(logits[0, 2:3], labels[0, 3:4], reduction="sum")
                + F.cross_entropy(logits[1, 1:2], labels[1, 2:3], reduction="sum"))
    assert torch.allclose(train.token_loss_sum(logits, labels), expected)


def test_loss_falls_on_a_fixed_batch(tiny_model, synthetic):
    from visionr1_trainer.config import DatasetRef
    from visionr1_trainer.data import read_cold
    from visionr1_trainer.grpo.engine import EngineSpec, TorchEngine

    model, tokenizer, processor = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    examples = read_cold(DatasetRef(source=str(synthetic.cold_start))).items[:4]
    data = build_training_data(examples, tokenizer, processor, 256, packing=False)
    batch = collate([load_group(data.group(i), processor) for i in range(4)], tokenizer.pad_token_id,
                    tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    engine = TorchEngine(LogprobModel(model), CPU, EngineSpec(0, "fp32", 4, 1.0, 3e-3))
    losses = [train.train_step(engine, [batch], CPU, lr=3e-3)["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(math_finite(x) for x in losses)


def test_the_loss_reads_a_chunked_head_without_full_vocabulary_logits(tiny_model, synthetic):
    """The SFT loss equals the cross-entropy of the HF logits, but no tensor the width of
    the vocabulary spans more than one chunk of positions, in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from visionr1_trainer.config import DatasetRef
    from visionr1_trainer.data import read_cold

    model, tokenizer, processor = load_vlm(str(tiny_model), "float32", "sdpa", "cpu")
    examples = read_cold(DatasetRef(source=str(synthetic.cold_start))).items[:4]
    data = build_training_data(examples, tokenizer, processor, 256, packing=False)
    batch = collate([load_group(data.group(i), processor) for i in range(4)], tokenizer.pad_token_id,
                    tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    assert batch.labels.shape[1] > 2 * 8
    expected = train.token_loss_sum(model(**batch.inputs).logits, batch.labels)
    chunked = LogprobModel(model, chunk_tokens=8)
    vocab, hidden = model.lm_head.weight.shape

    class Widest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab
                        and t.is_floating_point() and t.numel() != vocab * hidden):
                    Widest.most = max(Widest.most, t.numel() // vocab)
            return out

    with Widest():
        loss = train.labelled_logprob_sum(chunked, batch.inputs, batch.labels)
        loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert Widest.most <= 8, Widest.most  # before: (B, T, V) logits, 4 x T positions


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_sft_commits_checkpoints_and_a_model_that_loads(tiny_model, synthetic, tmp_path):
    out = tmp_path / "sft"
    summary = train.run(sft_config(out, tiny_model, {"data": {"source": str(synthetic.cold_start)}}))
    # 12 samples / batch 4 = 3 micro-batches -> 2 steps per epoch (2 + 1) -> 4 steps.
    assert summary["step"] == summary["totalSteps"] == 4 and summary["samples"] == 12
    assert summary["artifactUri"] == f"file://{out}/model"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert all((out / "checkpoints" / n / "_COMMITTED.json").exists() for n in ("step-00000002", "step-00000004"))
    steps = [json.loads(line) for line in (out / "_work" / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if s["type"] == "step"]
    assert [s["step"] for s in logged] == [1, 2, 3, 4]
    assert all(s["loss"] > 0 and s["tokens_per_second"] > 0 for s in logged)
    assert logged[0]["learning_rate"] == 0.0 and logged[1]["learning_rate"] == pytest.approx(1e-3)
    model, tokenizer, processor = load_vlm(str(out / "model"), "float32", "sdpa", "cpu")
    final = load_file(next((out / "model").glob("*.safetensors")))
    ckpt = load_file(next((out / "checkpoints" / "step-00000004" / "model").glob("*.safetensors")))
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    base = load_file(next(tiny_model.glob("*.safetensors")))
    assert any(not torch.equal(base[k], final[k]) for k in base)
    assert train.run(sft_config(out, tiny_model, {"data": {"source": str(synthetic.cold_start)}})) == summary


def test_stopped_sft_resumes_to_the_same_weights(tiny_model, synthetic, tmp_path, monkeypatch):
    data = {"data": {"source": str(synthetic.cold_start)}}
    straight = tmp_path / "straight"
    train.run(sft_config(straight, tiny_model, data))
    resumed = tmp_path / "resumed"
    checks = iter([False, False, False, True])  # stop before step 4 (after the step-2 checkpoint)
    monkeypatch.setattr(train, "stop_requested", lambda: next(checks, False))
    with pytest.raises(StageStopped):
        train.run(sft_config(resumed, tiny_model, data))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    summary = train.run(sft_config(resumed, tiny_model, data))
    assert summary["step"] == 4
    a = load_file(next((straight / "model").glob("*.safetensors")))
    b = load_file(next((resumed / "model").glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line)["step"] for line in (resumed / "_work" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "step"]
    assert logged == [1, 2, 3, 4]


def test_sft_reads_the_bridge_stage_output(tiny_model, synthetic, tmp_path):
    bridge_out = tmp_path / "bridge"
    bridge_pipeline.run(BridgeStageConfig.model_validate({
        "run": "demo", "stage": "bridge", "outputUri": f"file://{bridge_out}",
        "storage": {"uri": f"file://{tmp_path}"}, "model": {"name": "file://unused"}, "metricsPort": 0,
        "source": {"source": str(synthetic.bridge_source)},
        "bridge": {"multimodalModel": {"backend": "rule"}, "reasoningModel": {"backend": "rule"}},
    }))
    kept = json.loads((bridge_out / "dataset" / "stats.json").read_text())["kept"]
    summary = train.run(sft_config(tmp_path / "sft", tiny_model, {"dataUri": f"file://{bridge_out}"},
                                   epochs=1, packing=True, cutoffLength=512, saveEverySteps=100))
    assert summary["samples"] == kept and summary["step"] == summary["totalSteps"] >= 1


def test_fp16_without_deepspeed_is_refused(tiny_model, synthetic, tmp_path):
    config = sft_config(tmp_path, tiny_model, {"data": {"source": str(synthetic.cold_start)}}, precision="fp16")
    with pytest.raises(UnusableSetting, match="precision fp16 needs DeepSpeed's loss scaling \\(sft.deepspeedZeroStage"):
        make_engine(lambda: torch.nn.Linear(2, 2), lambda: None, CPU, train.engine_spec(config, CPU))


@pytest.mark.gpu
def test_sft_with_deepspeed_zero3_on_gpu(tiny_model, synthetic, tmp_path):
    pytest.importorskip("deepspeed")
    assert torch.cuda.is_available(), "needs a CUDA device"
    summary = train.run(sft_config(tmp_path / "sft", tiny_model, {"data": {"source": str(synthetic.cold_start)}},
                                   precision="bf16", deepspeedZeroStage=3))
    assert summary["step"] == 4 and summary["loss"] is not None
    model, _, _ = load_vlm(str(tmp_path / "sft" / "model"), "float32", "sdpa", "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
