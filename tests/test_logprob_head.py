"""LogprobModel: the policy's forward returning chunked completion log-probs (grpo/logprob_head.py).

On the tiny Qwen2.5-VL with an image: the same log-probs, entropies and parameter gradients
as the Hugging Face forward's logits, the Hugging Face parameter names, generation intact,
the cached-prefix path equal to the full-row path, and, under DeepSpeed ZeRO-3 on the CPU
(parameters released after every module's forward), the chunked head gathers lm_head's
weight itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from visionr1_trainer.grpo.algos import token_logprobs_and_entropy
from visionr1_trainer.grpo.logprob_head import ChunkedLMHead, LogprobModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from visionr1_trainer.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model")


def load(path):
    from visionr1_trainer.models.loading import load_vlm

    torch.manual_seed(0)
    return load_vlm(str(path), "float32")


def image_batch(tok, ip, T=6):
    from PIL import Image

    from visionr1_trainer.models.vlm import encode_prompts

    images = [[Image.new("RGB", (56, 56), c)] for c in ("red", "blue")]
    enc = encode_prompts(tok, ip, ["What color is the image?", "Which color?"], images, 128)
    completion = torch.randint(20, 200, (2, T), generator=torch.Generator().manual_seed(0))
    inputs = enc.model_inputs(tok.convert_tokens_to_ids("<|image_pad|>"))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(completion)], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion).int()], dim=1)
    return inputs, completion


@pytest.mark.parametrize("checkpointing", [False, True])
def test_logprobs_entropy_and_gradients_equal_the_hf_forward(tiny, checkpointing):
    model, tok, ip = load(tiny)
    model.train()
    inputs, completion = image_batch(tok, ip)
    T = completion.shape[1]
    logits = model(**inputs, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    ref_lp, ref_ent = token_logprobs_and_entropy(logits, completion, 0.8)
    ref_lp.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    policy = LogprobModel(model, chunk_tokens=5)  # 12 positions in 3 chunks
    if checkpointing:  # as the engine enables it (activationCheckpointing)
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lp, ent = policy(targets=completion, temperature=0.8, **inputs)
    lp.sum().backward()
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_names_are_the_checkpoints_and_generation_still_sees_logits(tiny):
    model, tok, ip = load(tiny)
    inputs, _ = image_batch(tok, ip)
    names = [n for n, _ in model.named_parameters()]
    state_keys = list(model.state_dict())
    before = model(**inputs, use_cache=False).logits
    policy = LogprobModel(model)
    assert [n for n, _ in policy.named_parameters()] == names
    assert list(policy.state_dict()) == state_keys
    assert isinstance(model.lm_head, ChunkedLMHead) and policy.hf is model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied
    torch.testing.assert_close(model(**inputs, use_cache=False).logits, before)
    torch.testing.assert_close(policy(**inputs, use_cache=False).logits, before)  # no targets: the HF forward
    assert LogprobModel(model).lm_head is model.lm_head  # installing twice changes nothing


def test_cached_prefix_path_equals_the_full_rows(tiny):
    model, tok, _ = load(tiny)
    policy = LogprobModel(model, chunk_tokens=4)
    prompt = torch.randint(20, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    completion = torch.randint(20, 200, (2, 5), generator=torch.Generator().manual_seed(2))
    full_lp, full_ent = policy(targets=completion, input_ids=torch.cat([prompt, completion], 1),
                               attention_mask=torch.ones(2, 12, dtype=torch.long))
    prefix = policy(input_ids=prompt, attention_mask=torch.ones(2, 7, dtype=torch.long), use_cache=True,
                    logits_to_keep=1)  # no targets: the HF forward
    lp, ent = policy(targets=completion, first_logits=prefix.logits[:, -1:], input_ids=completion,
                     attention_mask=torch.ones(2, 12, dtype=torch.long), past_key_values=prefix.past_key_values,
                     use_cache=True)
    torch.testing.assert_close(lp, full_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, full_ent, rtol=1e-5, atol=1e-5)


ZERO3_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import deepspeed
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from test_logprob_head import image_batch, load
    from visionr1_trainer.grpo.algos import token_logprobs_and_entropy
    from visionr1_trainer.grpo.logprob_head import LogprobModel

    dist.init_process_group("gloo", rank=0, world_size=1)
    model, tok, ip = load(sys.argv[1])
    inputs, completion = image_batch(tok, ip)
    T = completion.shape[1]
    ref = token_logprobs_and_entropy(model(**inputs, logits_to_keep=T + 1, use_cache=False).logits[:, :-1],
                                     completion, 1.0)[0]
    ref.sum().backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=LogprobModel(model, chunk_tokens=5), config=config)
    released = engine.module.lm_head.weight.numel()  # 0 while partitioned: outside its forward
    lp, ent = engine(targets=completion, temperature=1.0, **inputs)
    engine.backward(lp.sum())
    from deepspeed.utils import safe_get_full_grad
    grad = safe_get_full_grad(engine.module.lm_head.weight)
    print(json.dumps({"released": released, "lp_err": float((lp - ref).abs().max()),
                      "grad_err": float((grad - ref_grad).abs().max()), "grad_norm": float(ref_grad.norm())}))
""")


def test_under_zero3_the_head_gathers_its_own_weight(tiny, tmp_path):
    pytest.importorskip("deepspeed")
    import json

    from grpo_harness import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "TESTS_DIR": os.path.dirname(__file__), "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))}
    out = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(tiny)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["released"] == 0  # ZeRO-3 really partitioned lm_head
    assert result["lp_err"] < 1e-5
    assert result["grad_err"] < 1e-5 * max(result["grad_norm"], 1.0)
