"""Cold start as the paper ran it (issue 19, findings 1, 2 and 4): LLaMA-Factory's frozen
vision tower and projector, its 768 x 768 image cap and 180:1 squeeze, Vision-R1's global
batch; the encoded set compact and cached with the stage's work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from visionr1_trainer.config import SFTSettings, SFTStageConfig
from visionr1_trainer.data.formats import ColdExample
from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
from visionr1_trainer.runtime import StageStopped
from visionr1_trainer.sft import cache, train
from visionr1_trainer.sft.batches import load_group
from visionr1_trainer.sft.data import EncodedSet, encode_all, image_token_count
from visionr1_trainer.sft.images import ImageBounds, preprocess_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from visionr1_trainer.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", corpus=tokenizer_corpus(per_task=2))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), 8, seed=2, n_eval=1)


def qwen25_processor():
    """Qwen2.5-VL-7B-Instruct's image processor settings (its preprocessor_config.json)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def config(out, model, data: dict, **sft) -> SFTStageConfig:
    return SFTStageConfig.model_validate({
        "run": "demo", "stage": "sft", "outputUri": f"file://{out}", "storage": {"uri": f"file://{out.parent}"},
        "model": {"name": f"file://{model}", "dtype": "float32"}, "metricsPort": 0, **data,
        "sft": {"epochs": 1, "learningRate": 1e-3, "cutoffLength": 256, "perDeviceBatchSize": 4,
                "gradientAccumulationSteps": 1, "precision": "fp32", "deepspeedZeroStage": 0,
                "saveEverySteps": 1, **sft},
    })


# --- 1: the reference run's knobs ------------------------------------------------------------


def test_defaults_are_the_reference_runs():
    sft = SFTSettings()
    assert sft.freeze_vision_tower and sft.freeze_multi_modal_projector
    assert (sft.image_max_pixels, sft.image_min_pixels) == (768 * 768, 32 * 32)
    assert (sft.epochs, sft.learning_rate, sft.lr_scheduler, sft.warmup_ratio) == (2, 5e-6, "cosine", 0.05)
    assert (sft.cutoff_length, sft.per_device_batch_size, sft.gradient_accumulation_steps) == (16384, 1, 4)
    assert not sft.packing and sft.weight_decay == 0 and sft.max_grad_norm == 1.0


def test_the_7b_example_has_the_reference_global_batch_of_32():
    spec = yaml.safe_load((ROOT / "examples" / "vision-r1-7b.yaml").read_text())["spec"]["stages"]["sft"]
    resources = spec["resources"]
    batch = (resources["nodes"] * resources["gpusPerNode"] * spec.get("perDeviceBatchSize", 1)
             * spec.get("gradientAccumulationSteps", SFTSettings().gradient_accumulation_steps))
    assert batch == 32


def test_sft_trains_the_language_model_only_by_default(tiny_model, synthetic, tmp_path):
    train.run(config(tmp_path / "sft", tiny_model, {"data": {"source": str(synthetic.cold_start)}}))
    base = load_file(next(tiny_model.glob("*.safetensors")))
    final = load_file(next((tmp_path / "sft" / "model").glob("*.safetensors")))
    vision = [k for k in base if ".visual." in k or k.startswith("visual.")]
    assert vision and all(torch.equal(base[k], final[k]) for k in vision)  # before: all trained
    assert any(not torch.equal(base[k], final[k]) for k in base if k not in vision)


def test_freeze_settings_pick_the_parts(tiny_model):
    from visionr1_trainer.models.loading import load_model

    def trainable(tower, projector):
        return train.freeze_vision(load_model(str(tiny_model), "float32"), tower, projector)

    assert trainable(True, True)["vision_tower"] == trainable(True, True)["projector"] == 0
    parts = trainable(True, False)
    assert parts["vision_tower"] == 0 and parts["projector"] > 0 and parts["language_model"] > 0
    parts = trainable(False, False)
    assert parts["vision_tower"] > 0 and parts["projector"] > 0


def test_images_are_capped_at_768_squared_pixels_as_llama_factory_does(tmp_path):
    """Uncapped, 1920 x 1080 costs 2,691 image tokens and 4000 x 3000 15,301. LLaMA-Factory
    first scales them to 1024 x 576 and 886 x 665 (at most 768 x 768 pixels, sides
    truncated), then Qwen's processor rounds each side to a multiple of 28: 588 x 1036 and
    672 x 896 pixels, 777 and 768 tokens. (A processor whose own max_pixels were 768 x 768
    would give 720 and 713; LLaMA-Factory leaves the processor's limit alone.)"""
    processor = qwen25_processor()
    for (w, h), ours, uncapped in (((1920, 1080), 777, 2691), ((4000, 3000), 768, 15301)):
        Image.new("RGB", (w, h)).save(tmp_path / "big.png")
        assert image_token_count(str(tmp_path / "big.png"), processor) == ours
        huge = ImageBounds(max_pixels=100_000_000)
        assert image_token_count(str(tmp_path / "big.png"), processor, huge) == uncapped
    assert preprocess_size(20, 20, ImageBounds()) == (32, 32)  # min pixels, then the 28 floor
    assert preprocess_size(1000, 10, ImageBounds()) == (1000, 28)


# --- 2: an image with an aspect ratio over 200 ------------------------------------------------


def test_an_extreme_aspect_ratio_is_squeezed_to_180_to_1_not_raised(tmp_path):
    """Before: smart_resize raised ValueError (ratio 500), stopping the stage on every rank."""
    processor = qwen25_processor()
    Image.new("RGB", (14000, 28), (9, 9, 9)).save(tmp_path / "strip.png")
    assert preprocess_size(14000, 28, ImageBounds()) == (5040, 28)
    planned = image_token_count(str(tmp_path / "strip.png"), processor)
    assert planned == 180  # a 2 x 360 patch grid, merged 2 x 2
    from visionr1_trainer.sft.data import EncodedSample

    sample = EncodedSample("s", torch.zeros(0).numpy(), torch.zeros(0).numpy(), [str(tmp_path / "strip.png")],
                           [planned])
    group = load_group([sample], processor)  # raises if planned and processed counts disagree
    assert group["image_grid_thw"].tolist() == [[1, 2, 360]]


def test_an_image_the_processor_refuses_drops_its_sample_and_is_counted(tmp_path, monkeypatch):
    from visionr1_trainer.models.tiny import build_image_processor, build_tokenizer

    tokenizer, processor = build_tokenizer(), build_image_processor()
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    monkeypatch.setattr(type(processor), "get_number_of_image_patches",
                        lambda self, h, w, kw: (_ for _ in ()).throw(ValueError("absolute aspect ratio")))
    examples = [ColdExample("x", [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
                            [str(tmp_path / "a.png")]),
                ColdExample("t", [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}], [])]
    samples, skipped, index = encode_all(examples, tokenizer, processor, 256)
    assert skipped["bad_image"] == 1 and [s.id for s in samples] == ["t"] and index == [1]


# --- 4: compact and cached ------------------------------------------------------------------


def test_the_encoded_set_is_flat_arrays(tiny_model, synthetic):
    from visionr1_trainer.config import DatasetRef
    from visionr1_trainer.data import read_cold
    from visionr1_trainer.models.loading import load_processor_parts

    tokenizer, processor = load_processor_parts(str(tiny_model))
    examples = read_cold(DatasetRef(source=str(synthetic.cold_start))).items
    samples, _, index = encode_all(examples, tokenizer, processor, 256)
    encoded = EncodedSet.from_samples(samples, index)
    assert encoded.tokens.dtype == "int32" and encoded.trained.dtype == bool
    arrays = [encoded.tokens, encoded.trained, encoded.offsets, encoded.image_tokens, encoded.image_offsets]
    assert sum(a.nbytes for a in arrays) / len(encoded.tokens) < 6  # bytes a token (lists: ~70)
    for i, sample in enumerate(samples):
        again = encoded.sample(i)
        assert (again.input_ids == sample.input_ids).all() and (again.labels == sample.labels).all()
        assert again.image_tokens == sample.image_tokens and again.image_paths == sample.image_paths


def test_a_restarted_stage_does_not_encode_again(tiny_model, synthetic, tmp_path, monkeypatch):
    data = {"data": {"source": str(synthetic.cold_start)}}
    out = tmp_path / "sft"
    calls = []
    real = cache.encode_all
    monkeypatch.setattr(cache, "encode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    checks = iter([False, True])  # stop before step 2
    monkeypatch.setattr(train, "stop_requested", lambda: next(checks, False))
    with pytest.raises(StageStopped):
        train.run(config(out, tiny_model, data))
    assert calls == [1] and len(list((out / "encoded").iterdir())) == 1
    summary = train.run(config(out, tiny_model, data))  # resumed: the committed encoding is read
    assert calls == [1] and summary["step"] == summary["totalSteps"]
    started = [line for line in (out / "_work" / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert '"encoding_cached": true' in started[-1]


def test_the_encoding_key_follows_what_the_encoding_depends_on(tiny_model, synthetic):
    from visionr1_trainer.config import DatasetRef
    from visionr1_trainer.data import read_cold
    from visionr1_trainer.models.loading import load_processor_parts

    tokenizer, processor = load_processor_parts(str(tiny_model))
    examples = read_cold(DatasetRef(source=str(synthetic.cold_start))).items
    key = cache.encoding_key(examples, tokenizer, processor, 256, ImageBounds())
    assert key == cache.encoding_key(examples, tokenizer, processor, 256, ImageBounds())
    assert key != cache.encoding_key(examples, tokenizer, processor, 200, ImageBounds())
    assert key != cache.encoding_key(examples, tokenizer, processor, 256, ImageBounds(max_pixels=1024))
    assert key != cache.encoding_key(examples[1:], tokenizer, processor, 256, ImageBounds())
    tokenizer.chat_template = tokenizer.chat_template + " "
    assert key != cache.encoding_key(examples, tokenizer, processor, 256, ImageBounds())
