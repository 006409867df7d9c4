"""bench/memory_model.py: its parameter counts are transformers' own, its parts scale as ZeRO says.

The small-size check of its predictions against peaks measured on CPU is a benchmark
(``python bench/memory_model.py check``, recorded in BENCHMARKS.md), not a test.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_model as mm  # noqa: E402


def hf_config(s: mm.Shape):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                         tie_word_embeddings=s.tied),
        vision_config=dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                           num_heads=16, out_hidden_size=s.hidden, patch_size=s.patch, spatial_merge_size=s.merge,
                           temporal_patch_size=s.temporal_patch),
        tie_word_embeddings=s.tied)


@pytest.mark.parametrize("size", ["7B", "32B", "72B"])
def test_parameter_counts_are_those_of_the_transformers_model(size):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLForConditionalGeneration

    shape = mm.QWEN25_VL[size]
    with torch.device("meta"):  # no memory: shapes only
        model = Qwen2_5_VLForConditionalGeneration(hf_config(shape))
    assert mm.param_count(shape) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    counts = {size: mm.param_count(s) / 1e9 for size, s in mm.QWEN25_VL.items()}
    assert round(counts["7B"], 2) == 8.29 and round(counts["32B"], 1) == 33.5 and round(counts["72B"], 1) == 73.4


def test_zero_stages_partition_what_they_name():
    psi, n = 1_000_000, 8
    z0, z1, z2, z3 = (mm.model_states(psi, n, z, True, True) for z in (0, 1, 2, 3))
    assert z0["optimizer"] == 12 * psi and z1["optimizer"] == 12 * psi / n
    assert z0["gradients"] == 6 * psi  # bf16 .grad and fp32 master gradients
    assert z1["gradients"] == 4 * psi and z2["gradients"] == 4 * psi / n
    assert z2["weights"] == 2 * psi and z3["weights"] == 2 * psi / n
    assert z3["reference"] == 2 * psi / n and mm.model_states(psi, n, 3, True, False)["reference"] == 2 * psi


def test_checkpointing_and_chunking_bound_what_grows_with_the_sequence():
    shape, st = mm.QWEN25_VL["7B"], mm.Settings(ranks=8)
    short, long = (mm.grpo_peak(shape, st, t, 8)["train_logprobs"] for t in (4096, 8192))
    assert short == long  # one chunk, whatever the length
    unchunked = replace(st, chunk=None)
    assert mm.grpo_peak(shape, unchunked, 8192, 8)["train_logprobs"] == 2 * mm.grpo_peak(shape, unchunked, 4096, 8)[
        "train_logprobs"]
    full = mm.activations(8192, 28, 3584, 512, 18944, checkpointing=False)
    ckpt = mm.activations(8192, 28, 3584, 512, 18944, checkpointing=True)
    assert ckpt < full / 10


def test_the_recommended_7b_recipe_fits_and_the_unchunked_8k_stage_does_not():
    shape = mm.QWEN25_VL["7B"]
    st = mm.Settings(ranks=8)
    for completion, group in ((4096, 16), (8192, 8)):
        assert mm.grpo_peak(shape, st, completion, group)["peak"] < st.gpu_memory
    assert mm.grpo_peak(shape, replace(st, chunk=None), 8192, 8)["peak"] > st.gpu_memory  # issue 12, finding 9
    assert mm.sft_peak(shape, st)["peak"] < st.gpu_memory


def test_a_tp1_vllm_engine_cannot_hold_32b_in_its_share():
    st = mm.Settings(ranks=8)
    assert mm.vllm_capacity(mm.QWEN25_VL["7B"], st, 5120)["vllm_kv_sequences"] >= 1
    assert mm.vllm_capacity(mm.QWEN25_VL["32B"], st, 5120)["vllm_kv_sequences"] == 0
    assert mm.vllm_capacity(mm.QWEN25_VL["32B"], st, 5120, tp=4)["vllm_kv_sequences"] >= 1
