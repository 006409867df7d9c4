"""GRPO math against independent hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from visionr1_trainer.grpo.algos import (
    LOSS_AGGREGATIONS,
    completion_mask,
    get_aggregation,
    group_advantages,
    kl_k3,
    policy_loss,
    token_entropy,
    token_logprobs,
)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4, eps=1e-4)
    # group 1: mean 0.5, sample std sqrt(((.5^2)*4)/3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected1 = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)]
    # group 2: [1, 1, 0, 0] same mean and std
    expected2 = [0.5 / (s + 1e-4), 0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]
    assert torch.allclose(adv, torch.tensor(expected1 + expected2), atol=1e-6)


def test_group_advantages_equal_groups_get_exact_zeros_and_g1_is_zero():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.9, 0.6]), 3)
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[6:].abs().sum() > 0
    assert group_advantages(torch.tensor([1.0, 0.0]), 1).tolist() == [0.0, 0.0]


def test_group_advantages_matches_torch_std_definition():
    torch.manual_seed(0)
    rewards = torch.rand(5 * 8)
    adv = group_advantages(rewards, 8, eps=1e-4)
    g = rewards.view(5, 8)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(adv, expected)


@pytest.mark.parametrize("bad", [(torch.zeros(5), 2), (torch.zeros(2, 2), 2), (torch.zeros(4), 0)])
def test_group_advantages_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        group_advantages(*bad)


def test_kl_k3_zero_when_equal_and_hand_value():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp))
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    d = ref - lp  # [-0.5, 1.0, 0]
    expected = torch.exp(d) - d - 1
    assert torch.allclose(kl_k3(lp, ref), expected)
    assert (kl_k3(lp, ref) >= 0).all()
    assert math.isclose(kl_k3(lp, ref)[0, 0].item(), math.exp(-0.5) + 0.5 - 1, rel_tol=1e-6)


def hand_loss(lp, old, ref, adv, mask, el, eh, beta, aggregation):
    """An independent, loop-based computation of the same objective."""
    B, T = len(lp), len(lp[0])
    rows, total, count = [], 0.0, 0
    for b in range(B):
        row_sum, row_n = 0.0, 0
        for t in range(T):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            a = adv[b]
            surr = min(ratio * a, min(max(ratio, 1 - el), 1 + eh) * a)
            d = ref[b][t] - lp[b][t]
            kl = math.exp(d) - d - 1
            v = -(surr - beta * kl)
            row_sum += v
            row_n += 1
            total += v
            count += 1
        if row_n:
            rows.append(row_sum / row_n)
    if aggregation == "sequence_mean":
        return sum(rows) / len(rows) if rows else 0.0
    return total / count if count else 0.0


def as_lists(*ts):
    return [t.tolist() for t in ts]


def test_ratio_one_gives_minus_advantage_plus_kl_term():
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    adv = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 2)
    loss, stats = policy_loss(lp, lp, lp, adv, mask, beta=0.01)
    # ratio 1, KL 0: loss = -mean(A) over sequences
    assert math.isclose(loss.item(), -(1.5 - 0.5) / 2, rel_tol=1e-6)
    assert stats["kl"].item() == 0.0
    assert stats["clip_frac"].item() == 0.0
    assert math.isclose(stats["ratio_mean"].item(), 1.0)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_clipping_engaged_on_both_sides_against_hand_computation(aggregation):
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    # row 0: ratios e^{0.5}=1.65 (above 1.2), e^{0.1}, e^{-0.5}=0.61 (below 0.8); A > 0
    # row 1: same ratios, A < 0; row 2: one real token only
    lp = torch.tensor([[-0.5, -0.9, -1.5], [-0.5, -0.9, -1.5], [-0.7, -3.0, -3.0]])
    ref = torch.tensor([[-0.8, -1.0, -1.2], [-1.1, -0.9, -1.0], [-0.6, -1.0, -1.0]])
    adv = torch.tensor([2.0, -1.0, 0.7])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.05, aggregation)
    expected = hand_loss(*as_lists(lp, old, ref, adv, mask), 0.2, 0.28, 0.05, aggregation)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # upper clip active: row 0 token 0 (ratio 1.65 > 1.28, A>0); row 2 token 0 (e^{0.3}=1.35 > 1.28, A>0)
    # lower clip active: row 1 token 2 (ratio 0.61 < 0.8, A<0)
    assert math.isclose(stats["clip_frac_high"].item(), 2 / 7, rel_tol=1e-6)
    assert math.isclose(stats["clip_frac_low"].item(), 1 / 7, rel_tol=1e-6)
    assert math.isclose(stats["clip_frac"].item(), 3 / 7, rel_tol=1e-6)


def test_clipped_tokens_carry_no_gradient_and_unclipped_do():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratio 1.65 (clipped), 1.05 (not)
    loss, _ = policy_loss(lp, old, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0
    assert lp.grad[0, 1].item() < 0.0  # increasing logprob lowers the loss when A > 0


def test_sequence_mean_weights_sequences_equally_token_mean_weights_tokens():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert get_aggregation("sequence_mean")(values, mask).item() == pytest.approx((1.0 + 3.0) / 2)
    assert get_aggregation("token_mean")(values, mask).item() == pytest.approx((4.0 + 3.0) / 5)


def test_fully_masked_rows_are_excluded_and_all_masked_is_zero():
    values = torch.tensor([[2.0, 2.0], [100.0, 100.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert get_aggregation("sequence_mean")(values, mask).item() == 2.0
    assert get_aggregation("token_mean")(values, mask).item() == 2.0
    zero = torch.zeros(2, 2)
    for name in LOSS_AGGREGATIONS:
        assert get_aggregation(name)(values, zero).item() == 0.0


def test_masking_ignores_padding_values_entirely():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.1, 50.0, -50.0]])  # garbage on padding
    ref = torch.tensor([[0.0, -80.0, 80.0]])
    loss, stats = policy_loss(lp, old, ref, torch.tensor([1.0]), torch.tensor([[1, 0, 0]]), beta=0.1)
    expected = hand_loss([[0.1]], [[0.0]], [[0.0]], [1.0], [[1]], 0.2, 0.2, 0.1, "sequence_mean")
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert torch.isfinite(stats["kl"])


def test_unknown_aggregation_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: dr_grpo, sequence_mean, token_mean"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1),
                    beta=0.0, aggregation="seq")
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 0.25, 0.75
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(
        math.log(1 / (1 + math.sqrt(3)))
    )
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert token_entropy(logits).item() == pytest.approx(h)


def test_completion_mask_stops_after_first_eos():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 7, 9, 0], [5, 6, 7, 8, 4]])
    assert completion_mask(ids, eos, pad).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_fused_logprobs_and_entropy_match_the_separate_functions():
    from visionr1_trainer.grpo.algos import token_logprobs_and_entropy

    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    lp, h = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    assert torch.allclose(lp, token_logprobs(logits, tokens, temperature=0.7))
    assert torch.allclose(h, token_entropy(logits / 0.7))
    assert not h.requires_grad
