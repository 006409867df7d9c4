"""Log-probs and entropy from hidden states, chunked over tokens (grpo.algos / grpo.logprob_head).

Equal to the full-vocabulary computation in values and gradients, and bounded in memory:
a subprocess measures its peak resident memory (``ru_maxrss``, the kernel's high-water
mark, with glibc told to serve every large tensor by its own mmap, so its pages count
exactly while it lives)
for one forward and backward over 8192 tokens and a 16384-entry vocabulary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from visionr1_trainer.grpo.algos import chunked_logprobs_and_entropy, token_logprobs_and_entropy


def full(hidden, weight, tokens, temperature):
    return token_logprobs_and_entropy(torch.nn.functional.linear(hidden, weight), tokens, temperature)


def inputs(B=3, T=41, H=24, V=97, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=gen, dtype=dtype)).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=gen)
    return hidden, weight, tokens


@pytest.mark.parametrize("chunk", [1, 7, 41, 123, 10_000])
def test_values_and_gradients_equal_the_full_computation(chunk):
    hidden, weight, tokens = inputs()
    upstream = torch.randn(3, 41, generator=torch.Generator().manual_seed(1))  # any loss: a weighted sum
    lp, ent = chunked_logprobs_and_entropy(hidden, weight, tokens, 0.7, chunk_tokens=chunk)
    (lp * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_lp, ref_ent = full(hidden, weight, tokens, 0.7)
    (ref_lp * upstream).sum().backward()
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    assert lp.dtype == ent.dtype == torch.float32 and not ent.requires_grad


def test_bf16_weights_give_the_full_computations_bf16_logits():
    hidden, weight, tokens = inputs(dtype=torch.bfloat16)
    lp, ent = chunked_logprobs_and_entropy(hidden, weight, tokens, 1.0, chunk_tokens=16)
    ref_lp, ref_ent = full(hidden, weight, tokens, 1.0)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-2)  # bf16 matmuls, blocked differently
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-2)


def test_without_gradients_nothing_is_recomputed_and_values_match():
    hidden, weight, tokens = inputs()
    with torch.no_grad():
        lp, _ = chunked_logprobs_and_entropy(hidden, weight, tokens, 1.0, chunk_tokens=5)
        ref, _ = full(hidden, weight, tokens, 1.0)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, ref)


def test_bad_arguments_are_refused():
    hidden, weight, tokens = inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logprobs_and_entropy(hidden, weight, tokens, chunk_tokens=0)
    with pytest.raises(ValueError, match="differ"):
        chunked_logprobs_and_entropy(hidden, weight, tokens[:, :-1])


N_TOKENS, VOCAB, HIDDEN, CHUNK = 8192, 16384, 64, 256
PEAK_SCRIPT = textwrap.dedent(f"""
    import json, resource, sys
    import torch
    from visionr1_trainer.grpo.algos import chunked_logprobs_and_entropy, token_logprobs_and_entropy
    torch.set_num_threads(1)
    def run(h, w, t, chunked):
        if chunked:
            lp, ent = chunked_logprobs_and_entropy(h, w, t, 1.0, chunk_tokens={CHUNK})
        else:
            lp, ent = token_logprobs_and_entropy(torch.nn.functional.linear(h, w), t, 1.0)
        lp.sum().backward()
    gen = torch.Generator().manual_seed(0)
    make = lambda n: (torch.randn(1, n, {HIDDEN}, generator=gen).requires_grad_(),
                      (0.1 * torch.randn({VOCAB}, {HIDDEN}, generator=gen)).requires_grad_(),
                      torch.randint(0, {VOCAB}, (1, n), generator=gen))
    run(*make(8), chunked=sys.argv[1] == "chunked")  # warm up kernels and allocator
    h, w, t = make({N_TOKENS})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(h, w, t, chunked=sys.argv[1] == "chunked")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"peak_delta_bytes": (after - before) * 1024}}))
""")


def peak_delta(mode: str) -> int:
    # A fixed mmap threshold: every allocation of 1 MiB or more is its own mapping, returned
    # to the kernel when freed, so the high-water mark is that of the live tensors (glibc's
    # default moves the threshold up and keeps freed blocks, and the peak varies run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, timeout=300,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_bytes"]


def test_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    chunk_logits = CHUNK * VOCAB * 4  # one chunk's fp32 logits: 16 MiB
    # A few live copies of one chunk's logits (logits, log-softmax, their gradients), the
    # gradients of the weight and the hidden states, and slack for the allocator.
    bound = 6 * chunk_logits + 3 * VOCAB * HIDDEN * 4 + 3 * N_TOKENS * HIDDEN * 4 + 16 * 2**20  # 130 MiB
    full_logits = N_TOKENS * VOCAB * 4  # 512 MiB, what the unchunked computation holds several of
    chunked, unchunked = peak_delta("chunked"), peak_delta("full")
    assert chunked < bound, f"chunked peak {chunked / 2**20:.0f} MiB above the bound {bound / 2**20:.0f} MiB"
    assert unchunked > 2 * full_logits > bound  # the bound would catch the unchunked computation
