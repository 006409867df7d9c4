"""Pure parts of the GRPO engine: data order, micro-batch weighting, guards, vLLM requests."""

from __future__ import annotations

import torch
from PIL import Image

from visionr1_trainer.distributed import DistEnv, deepspeed_config
from visionr1_trainer.grpo.algos import policy_loss
from visionr1_trainer.grpo.batch import aggregation_weight, build_policy_batch, micro_batches, sequence_logprobs
from visionr1_trainer.grpo.logprob_head import LogprobModel
from visionr1_trainer.grpo.rollout import finish_rollout
from visionr1_trainer.grpo.trainer import batch_indices, rank_share
from visionr1_trainer.grpo.vllm_rollout import pad_completions, sampling_kwargs, vllm_requests
from visionr1_trainer.grpo.rollout import SamplingSettings
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.tiny import build_tiny_vlm
from visionr1_trainer.models.vlm import IMAGE_TOKEN, encode_prompts, mm_token_types
from visionr1_trainer.grpo.rollout import vision_token_ids
from visionr1_trainer.grpo.sampler import generate_groups, sample_next

import pytest


def test_batch_indices_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    assert batch_indices(3, 10, 4, seed=7) == batch_indices(3, 10, 4, seed=7)
    assert batch_indices(0, 10, 4, seed=7) != batch_indices(0, 10, 4, seed=8)
    epoch = batch_indices(0, 12, 4, 1) + batch_indices(1, 12, 4, 1) + batch_indices(2, 12, 4, 1)
    assert sorted(epoch) == list(range(12))  # one epoch = a permutation
    wrap = batch_indices(2, 10, 4, 1)  # crosses the epoch boundary: 2 from epoch 0, 2 from epoch 1
    assert len(wrap) == 4 and all(0 <= i < 10 for i in wrap)


def test_rank_share_splits_a_batch_without_overlap():
    idx = list(range(8))
    shares = [rank_share(idx, DistEnv(r, 3, r, "cpu", "gloo")) for r in range(3)]
    assert sorted(sum(shares, [])) == idx


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_micro_batch_accumulation_equals_the_full_batch_loss(aggregation):
    torch.manual_seed(0)
    B, T = 6, 5
    lp = torch.randn(B, T, requires_grad=True)
    old, ref = lp.detach() + 0.1 * torch.randn(B, T), lp.detach() + 0.1 * torch.randn(B, T)
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).long()
    mask[2] = 0  # a fully masked row
    full, _ = policy_loss(lp, old, ref, adv, mask, aggregation=aggregation)
    rows = list(range(B))
    acc = sum(
        policy_loss(lp[m], old[m], ref[m], adv[m], mask[m], aggregation=aggregation)[0]
        * aggregation_weight(mask, m, rows, aggregation)
        for m in micro_batches(rows, 4)
    )
    assert torch.allclose(acc, full, atol=1e-6)


def test_deepspeed_config_zero3():
    cfg = deepspeed_config(3, "bf16", micro_batch_size=1, max_grad_norm=1.0, world_size=16, hidden_size=3584)
    # The caller owns accumulation (boundary and weighting): DeepSpeed counts 1 micro-batch.
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_batch_size"] == 16
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    # transformers' numbers for "auto", which DeepSpeed itself does not accept
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 35840
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 3584 * 3584
    assert "auto" not in str(cfg)
    assert deepspeed_config(2, "bf16", 1, 1.0, 16, 3584, train=False)["zero_optimization"]["stage"] == 0
    # CPU ranks (gloo): DeepSpeed's own bucket sizes, the same persistence threshold
    cpu = deepspeed_config(3, "fp32", 1, 1.0, 2, 64, cpu_ranks=True)["zero_optimization"]
    assert cpu["reduce_bucket_size"] == 500_000_000 and cpu["stage3_prefetch_bucket_size"] == 50_000_000
    assert cpu["stage3_param_persistence_threshold"] == 640
    with pytest.raises(ValueError):
        deepspeed_config(0, "bf16", 1, 1.0, 1, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = build_tiny_vlm(tmp_path_factory.mktemp("tiny"))
    return load_vlm(str(d), "float32")


def test_sampled_image_token_is_masked_and_the_forward_does_not_crash(tiny):
    model, tok, ip = tiny
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_prompts(tok, ip, ["What color?"], [[Image.new("RGB", (56, 56), "red")]], 64)
    eos, word = tok.eos_token_id, tok.convert_tokens_to_ids("<think>")
    raw = torch.tensor([[word, image, word, eos], [word, word, eos, tok.pad_token_id]])
    rollout = finish_rollout(raw, tok, 4, 0.0)
    assert rollout.vision_token_rows.tolist() == [True, False]
    batch = build_policy_batch(enc, [1], rollout, 2, tok, image)
    assert batch.loss_mask[0].sum() == 0 and batch.loss_mask[1].sum() == 3
    assert (batch.completion_ids == image).sum() == 0  # replaced by padding
    logprobs, entropy = sequence_logprobs(LogprobModel(model), batch, [0, 1], 1.0, "cpu", with_entropy=True)
    assert logprobs.shape == (2, 4) and torch.isfinite(logprobs).all() and entropy.shape == (2, 4)


def test_too_long_prompts_are_dropped_and_reported_not_cut_into_image_tokens(tiny):
    _, tok, ip = tiny
    img = [Image.new("RGB", (56, 56), "blue")]
    enc = encode_prompts(tok, ip, ["short?", "a much longer question " * 20], [img, img], 48)
    assert enc.kept == [0] and enc.dropped_too_long == [1]
    assert (enc.input_ids == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 4
    assert len(enc.chat_texts) == 1 and len(enc.images) == 1


def _three_prompts(tok, ip):
    imgs = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (112, 56), "blue")],
            [Image.new("RGB", (56, 56), "green")]]
    questions = ["What color?", "What color is it now, please? Think.", "<image>What color is the image?"]
    return encode_prompts(tok, ip, questions, imgs, 128)  # three lengths: left padding differs


def test_shared_prefix_sampler_decodes_exactly_what_generate_decodes(tiny):
    """Greedy decoding: one prefill per prompt + cache repeated G times == generate on G copies."""
    model, tok, ip = tiny
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc, group = _three_prompts(tok, ip), 3
    ours, _, _ = generate_groups(model, enc, group, 12, 0.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    ids = enc.input_ids.repeat_interleave(group, 0)
    chunks = torch.split(enc.pixel_values, enc.image_grid_thw.prod(dim=1).tolist())  # one per image
    pixels = torch.cat([chunk for chunk in chunks for _ in range(group)])
    grid = enc.image_grid_thw.repeat_interleave(group, 0)
    theirs = model.generate(
        input_ids=ids, attention_mask=enc.attention_mask.repeat_interleave(group, 0), pixel_values=pixels,
        image_grid_thw=grid, mm_token_type_ids=mm_token_types(ids, image), do_sample=False, max_new_tokens=12,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )[:, ids.shape[1]:]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)


def test_sampler_log_probs_match_the_training_forward(tmp_path):
    """The positions, cache and images the sampler uses are those the trainer scores with.

    A warmed-up model (varied outputs) samples at temperature 1; the training forward on
    the full sequences must give the sampler's own log-probs back, up to the mass of the
    suppressed vision tokens (which the sampler renormalises away).
    """
    from grpo_harness import build_warm_model

    model, tok, ip = load_vlm(str(build_warm_model(tmp_path / "m", steps=20)), "float32")
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc, group = _three_prompts(tok, ip), 3
    torch.manual_seed(0)
    ids, sampled_lp, secs = generate_groups(model, enc, group, 24, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id,
                                            image, vision_token_ids(tok), with_logprobs=True)
    rollout = finish_rollout(ids, tok, 24, secs)
    batch = build_policy_batch(enc, [1, 1, 1], rollout, group, tok, image)
    with torch.no_grad():
        train_lp, _ = sequence_logprobs(LogprobModel(model), batch, range(batch.rows), 1.0, "cpu")
    mask = rollout.mask.bool()
    assert mask.sum() > 20
    assert (train_lp[mask] - sampled_lp[mask]).abs().max() < 0.05


def test_shared_prefix_forward_equals_the_full_forward_in_value_and_gradient(tiny):
    """Training on each prompt once (KV cache repeated per row) is the same computation."""
    model, tok, ip = tiny
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc, group = _three_prompts(tok, ip), 3
    torch.manual_seed(0)
    ids, _, secs = generate_groups(model, enc, group, 10, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id,
                                   image, vision_token_ids(tok))
    batch = build_policy_batch(enc, [1, 1, 1], finish_rollout(ids, tok, 10, secs), group, tok, image)
    rows = [0, 2, 3, 4, 8]  # partial groups, as a micro-batch may cut them
    results = []
    for shared in (False, True):
        model.zero_grad()
        logprobs, _ = sequence_logprobs(LogprobModel(model), batch, rows, 1.0, "cpu", shared_prefix=shared)
        (logprobs * batch.loss_mask[rows]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), grads))
    (full, full_grads), (shared, shared_grads) = results
    mask = batch.loss_mask[rows].bool()
    assert torch.allclose(full[mask], shared[mask], atol=1e-4)
    assert full_grads.keys() == shared_grads.keys()
    assert any("visual" in n for n in shared_grads)  # the vision tower trains through the prefix
    for name in full_grads:
        assert torch.allclose(full_grads[name], shared_grads[name], atol=1e-4, rtol=1e-3), name
    model.zero_grad()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_decoding_with_the_ready_step_mask_samples_what_the_2d_mask_samples(tmp_path, monkeypatch, implementation):
    """The sampler hands each decoding step a ready 4-D mask (transformers then skips
    building it): tokens and log-probs equal those of the 2-D mask, left padding and
    image tokens included, for both attention kernels that take one."""
    from grpo_harness import build_warm_model

    from visionr1_trainer.grpo import sampler

    model, tok, ip = load_vlm(str(build_warm_model(tmp_path / "m", steps=20)), "float32",
                              attn_implementation=implementation)
    assert sampler.step_mask_kernel(model) == implementation
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc, group = _three_prompts(tok, ip), 3
    runs = []
    for ready in (True, False):
        if not ready:  # the 2-D mask, which transformers turns into a 4-D one at every step
            monkeypatch.setattr(sampler, "decode_mask", lambda attention, *_: attention)
        torch.manual_seed(0)
        runs.append(generate_groups(model, enc, group, 16, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id, image,
                                    vision_token_ids(tok), with_logprobs=True))
    (ids, lp, _), (ids_2d, lp_2d, _) = runs
    assert torch.equal(ids, ids_2d)
    assert torch.allclose(lp, lp_2d, atol=1e-5)


def test_decode_mask_for_each_kernel():
    from visionr1_trainer.grpo.sampler import decode_mask

    attention = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sdpa = decode_mask(attention, "sdpa", torch.float32)
    assert sdpa.shape == (2, 1, 1, 3) and sdpa.dtype == torch.bool and sdpa[0, 0, 0].tolist() == [False, True, True]
    eager = decode_mask(attention, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager[0, 0, 0, 0] == torch.finfo(torch.bfloat16).min
    assert eager[1].eq(0).all()
    assert decode_mask(attention, None, torch.float32) is attention  # flash attention, sliding windows
    assert decode_mask(torch.ones(2, 3), "sdpa", torch.float32, padded=False) is None  # as transformers: no mask


def test_step_mask_kernel_leaves_sliding_windows_and_flash_attention_to_transformers():
    from types import SimpleNamespace

    from visionr1_trainer.grpo.sampler import step_mask_kernel

    def model(**text):
        return SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(**text)))

    assert step_mask_kernel(model(_attn_implementation="sdpa", layer_types=["full_attention"] * 2)) == "sdpa"
    assert step_mask_kernel(model(_attn_implementation="eager")) == "eager"
    assert step_mask_kernel(model(_attn_implementation="flash_attention_2")) is None
    assert step_mask_kernel(model(_attn_implementation="sdpa", use_sliding_window=True)) is None
    assert step_mask_kernel(model(_attn_implementation="sdpa", layer_types=["full_attention", "sliding_attention"])) is None


def test_text_only_prompts_after_an_image_batch_sample_and_score_consistently(tmp_path):
    """transformers recomputes a Qwen-VL model's M-RoPE deltas only for inputs with images:
    after an image batch of 3 prompts, a text-only prefix must not read those stale deltas.

    Regression: validation's filler prompt (one text-only row) on a rank whose held-out
    prompts were all too long crashed under ZeRO-3 (the deltas of the previous call's 4
    rows); with a batch of the same size it would have shifted every decoded position.
    """
    from grpo_harness import build_warm_model

    model, tok, ip = load_vlm(str(build_warm_model(tmp_path / "m", steps=20)), "float32")
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    generate_groups(model, _three_prompts(tok, ip), 1, 2, 0.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    assert model.model.rope_deltas.shape[0] == 3  # left behind by the image batch
    one = encode_prompts(tok, ip, ["What color?"], [[]], 128)
    ids, _, _ = generate_groups(model, one, 1, 4, 0.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    assert ids.shape[0] == 1
    generate_groups(model, _three_prompts(tok, ip), 1, 2, 0.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    text = encode_prompts(tok, ip, ["What color?", "Which color is it, please? Think first."], [[], []], 128)
    assert (text.attention_mask == 0).any()  # left padding
    torch.manual_seed(0)
    ids, sampled_lp, secs = generate_groups(model, text, 3, 16, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id, image,
                                            vision_token_ids(tok), with_logprobs=True)
    batch = build_policy_batch(text, [0, 0], finish_rollout(ids, tok, 16, secs), 3, tok, image)
    mask = batch.loss_mask.bool()
    with torch.no_grad():
        policy = LogprobModel(model)
        full, _ = sequence_logprobs(policy, batch, range(batch.rows), 1.0, "cpu", shared_prefix=False)
        shared, _ = sequence_logprobs(policy, batch, range(batch.rows), 1.0, "cpu", shared_prefix=True)
    assert (full[mask] - sampled_lp[mask]).abs().max() < 0.05  # up to the suppressed vision tokens' mass
    assert torch.allclose(full[mask], shared[mask], atol=1e-4)


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, 1.0).tolist() == [1, 0]
    torch.manual_seed(0)
    # top_p 0.5: only the most likely token of each row survives
    draws = torch.stack([sample_next(logits, 1.0, 0.5) for _ in range(50)])
    assert (draws == torch.tensor([1, 0])).all()
    draws = torch.stack([sample_next(logits, 1.0, 1.0) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}


def test_vllm_request_building_is_pure():
    img = Image.new("RGB", (8, 8))

    class Enc:
        chat_texts = ["p0", "p1"]
        images = [[img], []]

    assert vllm_requests(Enc) == [{"prompt": "p0", "multi_modal_data": {"image": [img]}}, {"prompt": "p1"}]
    kw = sampling_kwargs(SamplingSettings(16, 4096, 1.0, 0.95), seed=3, banned=[7, 9])
    assert kw["n"] == 16 and kw["max_tokens"] == 4096 and kw["top_p"] == 0.95
    assert kw["logit_bias"] == {7: -100.0, 9: -100.0} and kw["seed"] == 3
    assert pad_completions([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]


def test_text_only_models_get_pad_free_positions_in_the_prefix(tmp_path):
    """A plain causal LM numbers left padding unless told otherwise; the prefix must not.

    Regression: the shared prefix used padded positions and the completion pad-free
    ones, so padded rows scored differently from the full forward (found by the TRL
    cross-check in bench/grpo_vs_trl.py).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from visionr1_trainer.models.tiny import build_tokenizer

    tok = build_tokenizer(["What is 1 + 2?"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    ))
    enc = encode_prompts(tok, None, ["What is 1 + 2?", "What is 10 + 20 + 30 + 40, please?"], [[], []], 128)
    assert (enc.attention_mask == 0).any()  # the short prompt is left-padded
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ours, _, secs = generate_groups(model, enc, 2, 8, 0.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    theirs = model.generate(input_ids=enc.input_ids.repeat_interleave(2, 0), do_sample=False, max_new_tokens=8,
                            attention_mask=enc.attention_mask.repeat_interleave(2, 0),
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, enc.input_ids.shape[1]:]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    batch = build_policy_batch(enc, [0, 0], finish_rollout(ours, tok, 8, secs), 2, tok, image)
    with torch.no_grad():
        policy = LogprobModel(model)
        full, _ = sequence_logprobs(policy, batch, range(4), 1.0, "cpu", shared_prefix=False)
        shared, _ = sequence_logprobs(policy, batch, range(4), 1.0, "cpu", shared_prefix=True)
    mask = batch.loss_mask.bool()
    assert torch.allclose(full[mask], shared[mask], atol=1e-4)


def test_step_metrics_are_averaged_over_ranks_in_one_collective(monkeypatch):
    from visionr1_trainer.grpo import trainer

    calls = []

    def fake_all_reduce_mean(value, env):
        calls.append(value.shape)
        return value / 2  # as if the other rank reported zeros

    monkeypatch.setattr(trainer, "all_reduce_mean", fake_all_reduce_mean)
    env = DistEnv(0, 2, 0, "cpu", "gloo")
    out = trainer.mean_over_ranks({"a": torch.tensor(1.0), "b": 3, "c": torch.tensor([5.0])}, env)
    assert out == {"a": 0.5, "b": 1.5, "c": 2.5} and calls == [(3,)]
    monkeypatch.undo()
    assert trainer.mean_over_ranks({"a": 2.0}, DistEnv(0, 1, 0, "cpu", None)) == {"a": 2.0}
