"""The hf backend on the tiny Qwen2.5-VL, alone and driving the bridge end to end."""

from __future__ import annotations

import ast
import json

import pytest

from visionr1_trainer.bridge import pipeline
from visionr1_trainer.bridge.backends import GeneratorContext, Request, make_generator
from visionr1_trainer.config import BridgeStageConfig, GeneratorSpec
from visionr1_trainer.data.synthetic import generate, tokenizer_corpus


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from visionr1_trainer.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", corpus=tokenizer_corpus(per_task=2))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), 4, seed=2, n_eval=1)


def hf_spec(model) -> dict:
    return {"backend": "hf", "model": str(model), "maxTokens": 6, "temperature": 1.0, "concurrency": 2}


def test_hf_generates_from_image_and_text_prompts_reproducibly(tiny_model, synthetic):
    spec = GeneratorSpec.model_validate(hf_spec(tiny_model))
    image = str(synthetic.root / "images" / "train-color-000000.png")
    requests = [Request("a", "pseudo_cot", "What color is the shape?", (image,)),
                Request("b", "reasoning", "A red circle. What color is it?")]
    first = make_generator(spec, GeneratorContext("multimodal", seed=7)).generate(requests)
    again = make_generator(spec, GeneratorContext("multimodal", seed=7)).generate(requests)
    assert all(c.text and c.error is None for c in first)
    assert first == again


def test_bridge_with_hf_backend_accounts_for_every_sample(tiny_model, synthetic, tmp_path):
    config = BridgeStageConfig.model_validate({
        "run": "r", "stage": "bridge", "outputUri": f"file://{tmp_path}/out",
        "storage": {"uri": f"file://{tmp_path}"}, "model": {"name": str(tiny_model)}, "metricsPort": 0,
        "source": {"source": str(synthetic.bridge_source)},
        "bridge": {"multimodalModel": hf_spec(tiny_model), "reasoningModel": hf_spec(tiny_model),
                   "shards": 2, "filters": {"answerMatch": False}},
    })
    # An untrained model writes no final answer: every sample is dropped, counted, and the
    # stage fails saying so rather than committing an empty data set (issue 18).
    with pytest.raises(pipeline.NothingKept, match=r"kept 0 of 4 samples") as info:
        pipeline.run(config)
    dropped = ast.literal_eval(str(info.value).split("(dropped ", 1)[1].split(", source rows")[0])
    assert set(dropped) <= {"no_final_answer", "bad_format", "repetitive", "duplicate", "truncated"}
    assert sum(dropped.values()) == 4
    assert not (tmp_path / "out" / "dataset" / "_COMMITTED.json").exists()
    shard = [json.loads(line) for line in
             (tmp_path / "out" / "shards" / "describe-00000" / "rows.jsonl").read_text().splitlines()]
    assert all(r["pseudo_cot"] is not None and r["description"] is not None for r in shard)

