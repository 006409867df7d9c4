"""The GRPO stage scores completions without full-vocabulary logits (issue 12, finding 9).

A spy on every tensor operation (forward and backward, ``TorchDispatchMode``) records the
most positions that any vocabulary-wide tensor spans. Through ``sequence_logprobs`` on the
stage's engines, with a completion longer than a chunk, no ``(b, T, V)`` logits may appear:
only chunks of ``chunk_tokens`` positions (and the prefix pass's one position per row).
The values stay those of the Hugging Face forward's logits.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from visionr1_trainer.config import GRPOStageConfig
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.grpo.algos import LOGPROB_CHUNK_TOKENS, token_logprobs_and_entropy
from visionr1_trainer.grpo.batch import build_policy_batch, sequence_logprobs
from visionr1_trainer.grpo.logprob_head import LogprobModel
from visionr1_trainer.grpo.rollout import finish_rollout
from visionr1_trainer.grpo.trainer import frozen_logprobs, load_models
from visionr1_trainer.grpo.vllm_rollout import vllm_weight_name
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.tiny import build_tiny_vlm
from visionr1_trainer.models.vlm import IMAGE_TOKEN, encode_prompts

import pytest
from PIL import Image

from grpo_harness import grpo_config, write_color_task


class VocabWidePositions(TorchDispatchMode):
    """The most positions (rows) of any tensor whose last dimension is the vocabulary.

    Tensors the size of the output projection's weight ``(V, H)`` / ``(H, V)`` (the weight,
    its transpose, its gradient) are parameters, not logits, and are not counted.
    """

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.most = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.is_floating_point() and t.numel() != self.vocab * self.hidden):
                self.most = max(self.most, t.numel() // self.vocab)
        return out


def long_batch(tok, ip, completion_len: int, group: int = 3):
    """Three prompts with an image each, ``group`` random completions of ``completion_len`` tokens
    (no EOS: every token is real)."""
    images = [[Image.new("RGB", (56, 56), c)] for c in ("red", "blue", "green")]
    enc = encode_prompts(tok, ip, ["What color?", "What color is it now, please?", "Which color?"], images, 128)
    raw = torch.randint(20, 200, (3 * group, completion_len), generator=torch.Generator().manual_seed(0))
    rollout = finish_rollout(raw, tok, completion_len, 0.0)
    return build_policy_batch(enc, [1, 1, 1], rollout, group, tok, tok.convert_tokens_to_ids(IMAGE_TOKEN))


def spans(vocab: int, hidden: int, run) -> int:
    """The most positions of any vocabulary-wide tensor while ``run()`` runs."""
    spy = VocabWidePositions(vocab, hidden)
    with spy:
        run()
    return spy.most


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_sequence_logprobs_holds_one_chunk_of_logits_in_forward_and_backward(tiny_dir, shared_prefix):
    model, tok, ip = load_vlm(str(tiny_dir), "float32")
    vocab, hidden = model.lm_head.weight.shape
    batch, rows, chunk = long_batch(tok, ip, 40), [0, 2, 3, 4, 8], 8  # 5 x 40 positions, 8 per chunk
    targets = batch.completion_ids[rows]
    T = targets.shape[1]
    with torch.no_grad():  # the Hugging Face forward's logits: what the values must equal
        logits = model(**batch.model_inputs(rows, "cpu"), logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        want_lp, want_ent = token_logprobs_and_entropy(logits, targets, 1.0)
    assert logits.shape[:2] == (5, 40) and 5 * 40 > chunk
    policy = LogprobModel(model, chunk_tokens=chunk)
    out = {}

    def train_forward_and_backward():
        out["lp"], out["ent"] = sequence_logprobs(policy, batch, rows, 1.0, "cpu", with_entropy=True,
                                                  shared_prefix=shared_prefix)
        (out["lp"] * batch.loss_mask[rows]).sum().backward()

    most = spans(vocab, hidden, train_forward_and_backward)
    assert 0 < most <= chunk, f"a vocabulary-wide tensor spanned {most} positions (chunks of {chunk})"
    torch.testing.assert_close(out["lp"].detach(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ent"], want_ent, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.grad is not None


def test_the_stage_engines_score_through_the_chunked_head(tmp_path, tiny_dir):
    """load_models' policy (training forward and backward, old log-probs) and reference."""
    doc = grpo_config(tmp_path, tiny_dir, write_color_task(tmp_path / "data"), microBatchSize=2)
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    _, policy, reference, tok, ip, _ = load_models(cfg, DistEnv(0, 1, 0, "cpu", None), tmp_path / "w")
    assert reference is not None
    plain = load_vlm(str(tiny_dir), "float32")[0]
    vocab, hidden = plain.lm_head.weight.shape
    # What vLLM's weight sync and saving see: the Hugging Face names, not the wrapper's.
    assert [vllm_weight_name(n) for n, _ in policy.iter_full_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(policy.full_state_dict()) == list(plain.state_dict())
    T = LOGPROB_CHUNK_TOKENS // 2 + 100  # 2 rows of a micro-batch: more positions than one chunk
    batch = long_batch(tok, ip, T, group=2)

    def train_step():
        lp, _ = sequence_logprobs(policy, batch, [0, 1], 1.0, "cpu", with_entropy=True)
        policy.backward(lp.sum())

    for run in (train_step,
                lambda: frozen_logprobs(policy, batch, [0, 1], cfg.grpo, "cpu"),
                lambda: frozen_logprobs(reference, batch, [0, 1], cfg.grpo, "cpu", shared_prefix=False)):
        most = spans(vocab, hidden, run)
        assert 0 < most <= LOGPROB_CHUNK_TOKENS < 2 * T, most


def test_a_plain_hugging_face_model_is_refused_not_scored_on_full_logits(tiny_dir):
    model, tok, ip = load_vlm(str(tiny_dir), "float32")
    batch = long_batch(tok, ip, 4)
    with pytest.raises(TypeError, match="LogprobModel"):
        sequence_logprobs(model, batch, [0, 1], 1.0, "cpu", shared_prefix=False)
