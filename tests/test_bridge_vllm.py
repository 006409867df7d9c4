"""The vllm backend's pure parts (vLLM itself needs a GPU and is not installed here)."""

from __future__ import annotations

import base64
import importlib.util

import pytest
from PIL import Image

from visionr1_trainer.bridge.backends import GeneratorContext, chat_messages, make_generator
from visionr1_trainer.bridge.backends.vllm_engine import engine_kwargs, sampling_kwargs, split_output
from visionr1_trainer.config import GeneratorSpec

SPEC = GeneratorSpec.model_validate({"backend": "vllm", "model": "Qwen/Qwen2.5-VL-72B-Instruct",
                                     "tensorParallelSize": 8, "maxTokens": 4096, "temperature": 0.7,
                                     "topP": 0.9})


def test_sampling_and_engine_arguments():
    assert sampling_kwargs(SPEC, seed=3) == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 4096,
                                             "seed": 3, "n": 1}
    mm = engine_kwargs(SPEC, "/models/qwen", "multimodal", 3)
    assert mm == {"model": "/models/qwen", "tensor_parallel_size": 8, "seed": 3,
                  "trust_remote_code": False, "limit_mm_per_prompt": {"image": 4}}
    assert "limit_mm_per_prompt" not in engine_kwargs(SPEC, "/models/r1", "reasoning", 3)


def test_chat_messages_carry_images_as_data_urls(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    [message] = chat_messages("Describe.", [str(tmp_path / "a.png")])
    image, text = message["content"]
    assert text == {"type": "text", "text": "Describe."}
    head, data = image["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(data) == (tmp_path / "a.png").read_bytes()
    assert chat_messages("Only text.") == [{"role": "user", "content": "Only text."}]


def test_split_output():
    assert split_output("Wait.</think> 5").text == "Wait.</think> 5"
    assert split_output("  ").error == "vllm_empty"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs vLLM.*gpu extra"):
        make_generator(SPEC, GeneratorContext("multimodal"))


def test_unknown_backend_names_the_valid_ones():
    class Spec:
        backend = "tgi"

    with pytest.raises(ValueError, match="unknown generation backend 'tgi'; valid: hf, openai, rule, vllm"):
        make_generator(Spec(), GeneratorContext("multimodal"))
