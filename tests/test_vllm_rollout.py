"""The colocated vLLM rollout's pure parts and its orchestration, on CPU without vLLM.

vLLM has no CPU wheel: the engine itself runs in tests/test_vllm_gpu.py (``make gpu-smoke``).
Here a fake ``vllm`` module and a fake ``LLM`` record what the rollout asks of the engine.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from visionr1_trainer.grpo import vllm_rollout as vr
from visionr1_trainer.grpo.algos import completion_mask
from visionr1_trainer.grpo.rollout import SamplingSettings, finish_rollout
from visionr1_trainer.models.vlm import EncodedPrompts

# --- seeds ----------------------------------------------------------------------------------


def test_request_seeds_are_fresh_per_step_and_rank_and_reproducible():
    one = vr.request_seeds(42, step=3, rank=0, num_requests=128)
    assert one == vr.request_seeds(42, step=3, rank=0, num_requests=128)  # a rerun draws the same
    assert len(set(one)) == 128  # no two requests of a step share a random stream
    assert all(0 <= s < 2**31 for s in one)
    others = [vr.request_seeds(42, 4, 0, 128), vr.request_seeds(42, 3, 1, 128), vr.request_seeds(43, 3, 0, 128)]
    for other in others:  # another step, rank or stage seed: no seed in common
        assert not set(one) & set(other)
    steps = {vr.step_seed(42, s, r) for s in range(200) for r in range(8)}
    assert len(steps) == 1600


# --- stop tokens and the completion mask ------------------------------------------------------------


def vllm_stop_ids(kwargs: dict, tokenizer_eos: int, generation_config_eos: list[int]) -> set[int]:
    """The ids vLLM 0.33 ends a request at, for these SamplingParams arguments.

    A model of ``SamplingParams.update_from_generation_config`` (generation_config's
    ``eos_token_id`` ids join ``stop_token_ids`` unless ``ignore_eos``) and the V1
    scheduler's ``check_stop`` (the tokenizer EOS ends a request unless ``ignore_eos``;
    any id in ``stop_token_ids`` ends it).
    """
    ignore = kwargs.get("ignore_eos", False)
    stops = set(kwargs.get("stop_token_ids") or [])
    if not ignore:
        stops |= set(generation_config_eos) - {tokenizer_eos}
        stops.add(tokenizer_eos)
    return stops


EOS, PAD = 7, 3  # Qwen2.5-VL: <|im_end|> is the tokenizer's EOS, <|endoftext|> pad and 2nd EOS


def test_vllm_stops_only_on_the_id_the_completion_mask_ends_at():
    sampling = SamplingSettings(num_generations=1, max_completion_length=8)
    kwargs = vr.sampling_kwargs(sampling, 0, [], eos_token_id=EOS, n=1)
    assert vllm_stop_ids(kwargs, EOS, [EOS, PAD]) == {EOS}
    # Without it vLLM also stops on the pad token, which the mask does not end at.
    assert vllm_stop_ids(vr.sampling_kwargs(sampling, 0, []), EOS, [EOS, PAD]) == {EOS, PAD}


def simulate_vllm(stream: list[int], stops: set[int], max_tokens: int) -> list[int]:
    """What vLLM returns for a sampled stream: up to and including the first stop id."""
    out = []
    for token in stream[:max_tokens]:
        out.append(token)
        if token in stops:
            break
    return out


def test_masks_of_vllm_completions_cover_exactly_what_was_sampled():
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, unk_token_id=None,
                                      convert_tokens_to_ids=lambda t: None)
    gen = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, 10, (12,), generator=gen).tolist() for _ in range(64)]
    kwargs = vr.sampling_kwargs(SamplingSettings(1, 8), 0, [], eos_token_id=EOS, n=1)
    rows = [simulate_vllm(s, vllm_stop_ids(kwargs, EOS, [EOS, PAD]), 8) for s in streams]
    assert any(PAD in r[:-1] for r in rows)  # a sampled pad token is a real token, not an end
    rollout = finish_rollout(vr.pad_completions(rows, PAD), tokenizer, 8, 0.0)
    for row, length, truncated in zip(rows, rollout.lengths.tolist(), rollout.truncated.tolist()):
        assert length == len(row)  # the mask covers every sampled token and nothing else
        assert truncated == (row[-1] != EOS)


def test_the_old_stop_rule_lets_padding_into_the_mask():
    # The bug this fixes: vLLM ended a completion at the pad token, the mask did not know
    # it, and the padding after it was trained on as completion tokens.
    rows = [[1, 2, PAD], [1, 2, 4, 5, EOS]]
    ids = vr.pad_completions(rows, PAD)
    assert completion_mask(ids, EOS, PAD)[0].sum() == ids.shape[1]  # 5 tokens counted, 3 sampled


# --- requests and engine arguments ---------------------------------------------------------------


def encoded(texts, images):
    n = len(texts)
    return EncodedPrompts(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), None, None,
                          list(range(n)), chat_texts=list(texts), images=[list(i) for i in images])


def test_requests_are_prompt_major_with_their_images():
    requests = vr.vllm_requests(encoded(["a", "b"], [["img-a"], []]), copies=3)
    assert [r["prompt"] for r in requests] == ["a"] * 3 + ["b"] * 3
    assert all(r["multi_modal_data"] == {"image": ["img-a"]} for r in requests[:3])
    assert all("multi_modal_data" not in r for r in requests[3:])


def test_each_request_samples_once_with_its_own_seed():
    settings = SamplingSettings(num_generations=16, max_completion_length=4096, temperature=1.0, top_p=1.0)
    per_request = vr.rollout_sampling_kwargs(settings, [5, 6, 7], [151655], EOS)
    assert [k["seed"] for k in per_request] == [5, 6, 7]
    assert all(k["n"] == 1 and k["max_tokens"] == 4096 and k["stop_token_ids"] == [EOS] for k in per_request)
    assert all(k["logit_bias"] == {151655: -100.0} for k in per_request)


def test_engine_kwargs_place_one_engine_per_rank():
    kwargs = vr.engine_kwargs("/staged", "bfloat16", 8192 + 4096, 0.3, seed=11)
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["tensor_parallel_size"] == 1
    assert kwargs["enable_sleep_mode"] is True
    assert kwargs["model"] == kwargs["tokenizer"] == "/staged"  # processor and tokenizer from one place
    assert kwargs["max_model_len"] == 12288 and kwargs["gpu_memory_utilization"] == 0.3


def test_launcher_env_fills_in_a_single_process_and_never_overrides_torchrun():
    single = vr.launcher_env(0, 0, 1, {}, 29555)
    assert single == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29555"}
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "pod-0", "MASTER_PORT": "29500"}
    assert vr.launcher_env(5, 1, 16, torchrun, 1) == {}


def test_weight_names_lose_wrapper_prefixes_only():
    assert vr.vllm_weight_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert vr.vllm_weight_name("module.model.visual.blocks.1.attn.qkv.weight") == "model.visual.blocks.1.attn.qkv.weight"
    assert vr.vllm_weight_name("model.language_model.layers.3._checkpoint_wrapped_module.self_attn.q_proj.weight") \
        == "model.language_model.layers.3.self_attn.q_proj.weight"
    assert vr.vllm_weight_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_the_engine_loads_what_the_policy_was_loaded_from(tmp_path):
    from visionr1_trainer.grpo.logprob_head import LogprobModel
    from visionr1_trainer.models.loading import load_vlm
    from visionr1_trainer.models.tiny import build_tiny_vlm

    model_dir = build_tiny_vlm(tmp_path / "ckpt")
    model, _, _ = load_vlm(str(model_dir), "float32")
    assert vr.policy_source(model, "s3://runs/sft/model") == str(model_dir)
    assert vr.policy_source(LogprobModel(model), "s3://runs/sft/model") == str(model_dir)  # wrapped
    assert vr.policy_source(torch.nn.Linear(1, 1), "fallback") == "fallback"


# --- the processor vLLM reads ----------------------------------------------------------------------


def test_staged_directory_carries_the_trainers_processor(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from visionr1_trainer.models.tiny import build_image_processor, build_tiny_vlm

    model_dir = build_tiny_vlm(tmp_path / "model")  # its own processor: 56 x 56 images
    training = build_image_processor(112)  # the trainer's: 112 x 112, 16 image tokens
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    staged = vr.stage_model_dir(model_dir, tokenizer, training, tmp_path / "staged")
    loaded = AutoImageProcessor.from_pretrained(staged)
    image = Image.new("RGB", (200, 150), "red")
    ours, theirs = training(images=[image], return_tensors="pt"), loaded(images=[image], return_tensors="pt")
    model_own = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == ours["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert model_own["image_grid_thw"].tolist() != ours["image_grid_thw"].tolist()  # what vLLM read before
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
    assert (staged / "model.safetensors").is_symlink()  # the weights are not copied
    assert (staged / "config.json").is_symlink()
    assert not (staged / "preprocessor_config.json").is_symlink()


# --- pushing weights -----------------------------------------------------------------------------


class FakeVLLMModel(torch.nn.Module):
    """vLLM-side names, and a load_weights that reports what it wrote (as AutoWeightsLoader does)."""

    def __init__(self, names):
        super().__init__()
        self.params = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(torch.zeros(2)) for n in names})
        self.calls = []

    def load_weights(self, weights):
        out = set()
        for name, tensor in weights:
            self.calls.append((name, tensor.dtype, tensor.clone()))
            key = name.replace(".", "_")
            if key in self.params:
                self.params[key].data.copy_(tensor)
                out.add(f"params.{key}")
        return out


def fake_worker(model):
    return types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))


def test_push_loads_one_parameter_at_a_time_in_vllms_dtype():
    model = FakeVLLMModel(["a.weight", "b.weight"])
    consumed = []

    def parameters():
        for name in ["module.a.weight", "module.b.weight"]:
            consumed.append(name)
            yield name, torch.full((2,), 1.5, dtype=torch.float32)

    assert vr.push_weights(fake_worker(model), parameters(), torch.bfloat16) == []
    assert [c[0] for c in model.calls] == ["a.weight", "b.weight"]
    assert all(c[1] == torch.bfloat16 for c in model.calls)
    assert consumed == ["module.a.weight", "module.b.weight"]


def test_push_names_parameters_left_unwritten_and_still_consumes_everything():
    model = FakeVLLMModel(["a.weight", "b.weight", "c.weight"])
    seen = []

    def parameters():
        for name in ["a.weight", "x.weight"]:
            seen.append(name)
            yield name, torch.ones(2)

    missing = vr.push_weights(fake_worker(model), parameters(), torch.float32)
    assert missing == ["params.b_weight", "params.c_weight"]
    assert seen == ["a.weight", "x.weight"]  # a collective under ZeRO-3: every rank runs it to the end


# --- orchestration with a fake engine --------------------------------------------------------------


class FakeLLM:
    """Records the calls a rollout makes; returns ``max_tokens`` copies of the request's seed % 10."""

    def __init__(self, model):
        self.model, self.log = model, []

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tuple(tags or ())))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def collective_rpc(self, fn):
        self.log.append(("collective_rpc",))
        return [fn(fake_worker(self.model))]

    def generate(self, requests, params, use_tqdm=False):
        self.log.append(("generate", len(requests)))
        self.seeds = [p.kwargs["seed"] for p in params]
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[1, p.kwargs["seed"] % 5, EOS])])
                for p in params]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeEngine:
    dtype = torch.bfloat16  # what grpo/engine.py's engines expose

    def __init__(self, names):
        self.names, self.iterations = names, 0

    def iter_full_parameters(self):
        self.iterations += 1
        for name in self.names:
            yield name, torch.ones(2)


@pytest.fixture
def rollout(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeSamplingParams))
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, unk_token_id=None,
                                      convert_tokens_to_ids=lambda t: None)
    policy = torch.nn.Linear(2, 2).to(torch.bfloat16)
    env = types.SimpleNamespace(rank=1, local_rank=1, world_size=2)
    config = types.SimpleNamespace(grpo=types.SimpleNamespace(seed=42))
    llm = FakeLLM(FakeVLLMModel(["a.weight"]))
    return vr.VLLMRollout(policy, tokenizer, env, config, llm=llm), llm


def test_first_rollout_uses_the_starting_weights_then_every_rollout_pushes_once(rollout):
    backend, llm = rollout
    prompts, settings = encoded(["q"], [[]]), SamplingSettings(2, 3)
    assert llm.log == [("sleep", 1)]  # KV cache freed, starting weights set aside once
    backend.generate(prompts, [0], settings, step=0)
    assert llm.log[1:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("generate", 2), ("sleep", 2)]
    engine = FakeEngine(["a.weight"])
    for _ in range(3):  # one sync per optimizer step (several mini-batches per rollout)
        backend.sync_weights(engine)
    llm.log.clear()
    out = backend.generate(prompts, [0], settings, step=1)
    assert engine.iterations == 1  # one transfer per rollout
    assert llm.log == [("wake_up", ("weights",)), ("collective_rpc",), ("reset_prefix_cache",),
                       ("wake_up", ("kv_cache",)), ("generate", 2), ("sleep", 2)]
    assert out.completion_ids.shape == (2, 3) and out.lengths.tolist() == [3, 3]
    backend.generate(prompts, [0], settings, step=2)
    assert engine.iterations == 2  # level 2 discarded them: the next rollout pushes again


def test_seeds_follow_the_step_so_a_resumed_stage_draws_what_an_unbroken_one_did(rollout):
    backend, llm = rollout
    prompts, settings = encoded(["q", "r"], [[], []]), SamplingSettings(2, 3)
    backend.sync_weights(FakeEngine(["a.weight"]))
    backend.generate(prompts, [0, 0], settings, step=7)
    at_seven = llm.seeds
    backend.generate(prompts, [0, 0], settings, step=8)
    assert not set(at_seven) & set(llm.seeds)
    backend.generate(prompts, [0, 0], settings, step=7)
    assert llm.seeds == at_seven == vr.request_seeds(42, 7, 1, 4)


def test_given_an_engine_the_first_rollout_pushes_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeSamplingParams))
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, unk_token_id=None,
                                      convert_tokens_to_ids=lambda t: None)
    engine = FakeEngine(["a.weight"])
    llm = FakeLLM(FakeVLLMModel(["a.weight"]))
    config = types.SimpleNamespace(grpo=types.SimpleNamespace(seed=42))
    backend = vr.VLLMRollout(engine, tokenizer, types.SimpleNamespace(rank=0, local_rank=0, world_size=1), config,
                             llm=llm)
    assert llm.log == [("sleep", 2)] and backend.dtype == torch.bfloat16  # nothing to keep: discarded
    backend.generate(encoded(["q"], [[]]), [0], SamplingSettings(1, 3), step=0)
    assert engine.iterations == 1 and ("collective_rpc",) in llm.log
    assert llm.model.calls[0][1] == torch.bfloat16


def test_a_rollout_after_discarding_the_weights_needs_a_policy(rollout):
    backend, _ = rollout
    prompts, settings = encoded(["q"], [[]]), SamplingSettings(1, 3)
    backend.generate(prompts, [0], settings, step=0)
    with pytest.raises(RuntimeError, match="sync_weights"):
        backend.generate(prompts, [0], settings, step=1)


def test_a_policy_missing_vllm_parameters_is_refused(rollout):
    backend, _ = rollout
    backend.sync_weights(FakeEngine(["other.weight"]))
    with pytest.raises(RuntimeError, match="no weights for 1 vLLM parameters"):
        backend.generate(encoded(["q"], [[]]), [0], SamplingSettings(1, 3), step=0)


# --- tensor parallel engines (32B, 72B) ----------------------------------------------------------


def test_tensor_parallel_groups_are_consecutive_ranks_within_a_node():
    assert vr.tensor_parallel_groups(16, 4, 8) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert vr.tensor_parallel_groups(8, 1, 8) == [[r] for r in range(8)]
    with pytest.raises(ValueError, match="vllmTensorParallelSize 4 must divide the ranks \\(6\\)"):
        vr.tensor_parallel_groups(6, 4, 6)
    with pytest.raises(ValueError, match="GPUs per node \\(4\\)"):
        vr.tensor_parallel_groups(16, 8, 4)  # an engine may not span nodes
    assert vr.share_slices([3, 0, 2]) == [slice(0, 3), slice(3, 3), slice(3, 5)]


def test_a_setting_that_cannot_split_is_refused_naming_the_field(monkeypatch):
    from visionr1_trainer.runtime import UnusableSetting

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, unk_token_id=None,
                                      convert_tokens_to_ids=lambda t: None)
    config = types.SimpleNamespace(grpo=types.SimpleNamespace(seed=42, vllm_tensor_parallel_size=4))
    env = types.SimpleNamespace(rank=0, local_rank=0, world_size=6)
    with pytest.raises(UnusableSetting, match="vllmTensorParallelSize"):
        vr.VLLMRollout(FakeEngine(["a.weight"]), tokenizer, env, config, llm=FakeLLM(FakeVLLMModel(["a.weight"])))


def test_ranks_of_one_engine_run_the_groups_requests_with_one_seed_stream_and_keep_their_share(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeSamplingParams))
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, unk_token_id=None,
                                      convert_tokens_to_ids=lambda t: None)
    config = types.SimpleNamespace(grpo=types.SimpleNamespace(seed=42, vllm_tensor_parallel_size=2))
    settings = SamplingSettings(2, 3)
    shares = {2: encoded(["a"], [[]]), 3: encoded(["b", "c"], [[], []])}  # ranks 2 and 3: engine 1
    local = {r: vr.vllm_requests(p, copies=2) for r, p in shares.items()}
    seen, outs = {}, {}
    for rank in (2, 3):
        llm = FakeLLM(FakeVLLMModel(["a.weight"]))
        backend = vr.VLLMRollout(FakeEngine(["a.weight"]), tokenizer,
                                 types.SimpleNamespace(rank=rank, local_rank=rank, world_size=4), config,
                                 llm=llm, gather=lambda requests: [local[2], local[3]])
        outs[rank] = backend.generate(shares[rank], [0] * len(shares[rank].kept), settings, step=5)
        seen[rank] = llm.seeds
    assert seen[2] == seen[3] == vr.request_seeds(42, 5, 1, 6)  # engine 1's stream, on both of its ranks
    assert outs[2].completion_ids.shape[0] == 2 and outs[3].completion_ids.shape[0] == 4
    # FakeLLM answers [1, seed % 5, EOS]: each rank got the rows of its own requests
    assert outs[2].completion_ids[:, 1].tolist() == [s % 5 for s in seen[2][:2]]
    assert outs[3].completion_ids[:, 1].tolist() == [s % 5 for s in seen[3][2:]]
