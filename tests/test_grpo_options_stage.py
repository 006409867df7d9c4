"""The GRPO options end to end: whole PTST stages on the tiny colour task (CPU), with a
spy on what the stage hands its loss, that show each option changes what it should and
nothing else (issue 16)."""

from __future__ import annotations

import pytest
import torch

from visionr1_trainer.config import GRPOStageConfig
from visionr1_trainer.grpo import collect as collect_mod
from visionr1_trainer.grpo import trainer as trainer_mod
from visionr1_trainer.grpo.algos import dynamic_sampling_keep, kl_k3, policy_loss, soft_overlong_penalty
from visionr1_trainer.metrics import read_jsonl
from visionr1_trainer.runtime import reset_stop

from grpo_harness import build_warm_model, grpo_config, write_color_task


pytestmark = pytest.mark.timeout(600)  # whole stages on a shared CPU


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo-options")
    return build_warm_model(base / "model"), write_color_task(base / "data")


@pytest.fixture(autouse=True)
def _clear_stop_flag():
    reset_stop()
    yield
    reset_stop()


def run_stage(tmp_path, assets, monkeypatch, steps=2, max_len=24, **grpo):
    """Run a stage; returns (metrics records, update_policy calls, policy_loss calls)."""
    model, data = assets
    doc = grpo_config(tmp_path, model, data, steps=steps, saveEverySteps=100, **grpo)
    doc["ptst"]["maxCompletionLength"] = max_len
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    updates, losses, rounds = [], [], []
    real_update, real_loss, real_round = trainer_mod.update_policy, trainer_mod.policy_loss, collect_mod.rollout_round

    def spy_update(state, batch, advantages):
        updates.append({"batch": batch, "advantages": advantages.clone()})
        return real_update(state, batch, advantages)

    def spy_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        losses.append({"args": [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args],
                       "kwargs": kwargs, "loss": out[0].detach().clone()})
        return out

    def spy_round(state, examples, step):
        out = real_round(state, examples, step)
        rounds.append(out)
        return out

    monkeypatch.setattr(trainer_mod, "update_policy", spy_update)
    monkeypatch.setattr(trainer_mod, "policy_loss", spy_loss)
    monkeypatch.setattr(collect_mod, "rollout_round", spy_round)
    trainer_mod.run(cfg)
    records = read_jsonl(tmp_path / "store" / "default" / "t" / "ptst-1" / "_work" / "metrics.jsonl")
    return records, updates, losses, rounds


def test_dr_grpo_advantages_are_centred_rewards_and_the_loss_divides_by_the_budget(tmp_path, assets, monkeypatch):
    _, updates, losses, rounds = run_stage(tmp_path, assets, monkeypatch, steps=1, microBatchSize=8,
                                           lossAggregation="dr_grpo", advantageScale="none")
    rewards = rounds[0].rewards.view(-1, 4)
    assert torch.equal(updates[0]["advantages"], (rewards - rewards.mean(dim=1, keepdim=True)).view(-1))
    assert rewards.std(dim=1).max() > 0  # some group carries signal, so the check above is not 0 == 0
    for call in losses:
        logprobs, old, ref, adv, mask = call["args"]
        assert mask.shape[1] == 24 and call["kwargs"]["aggregation"] == "dr_grpo"  # padded to the budget
        # by hand: ratio 1 at the first update, so per token -A + beta * k3; summed, / (rows x 24)
        per_token = -adv.unsqueeze(1) + 0.01 * kl_k3(logprobs, ref)
        expected = (per_token * mask).sum() / (mask.shape[0] * 24)
        assert call["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert len(losses) == 4  # 32 rows in micro-batches of 8


def test_gspo_uses_one_clipped_ratio_per_sequence(tmp_path, assets, monkeypatch):
    # two passes over the batch: the second sees a moved policy, so ratios differ from 1
    _, _, losses, _ = run_stage(tmp_path, assets, monkeypatch, steps=1, importanceSampling="sequence",
                                updatesPerBatch=2, learningRate=5e-3, beta=0.0)
    moved = losses[-1]
    logprobs, old, _, adv, mask = moved["args"]
    assert moved["kwargs"]["importance"] == "sequence"
    m = mask.float()
    # by hand: s_i = exp(mean of the row's token log-ratios), clipped, the same on all its tokens
    s = torch.exp(((logprobs - old) * m).sum(1) / m.sum(1).clamp(min=1))
    assert (s - 1).abs().max() > 1e-4  # the policy moved
    surrogate = torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv)  # (B,)
    has = (m.sum(1) > 0).float()
    expected = -(surrogate * has).sum() / has.sum()  # sequence_mean of a per-row constant
    assert moved["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    token, _ = policy_loss(logprobs, old, None, adv, mask, beta=0.0, importance="token")
    assert abs(token.item() - moved["loss"].item()) > 1e-6  # a different objective on the same inputs


def test_dynamic_sampling_trains_only_on_groups_with_signal_and_refills(tmp_path, assets, monkeypatch):
    records, updates, _, rounds = run_stage(tmp_path, assets, monkeypatch, steps=3, dynamicSampling=True,
                                            dynamicSamplingMaxRounds=4)
    dropped = sum(r["dynamic_dropped_groups"] for r in records)
    assert dropped > 0, records  # the warm model is right ~70% of the time: some groups all agree
    assert sum(r["dynamic_extra_prompts"] for r in records) > 0
    assert len(rounds) > 3  # extra rollout rounds ran
    for update, record in zip(updates, records):
        adv = update["advantages"].view(-1, 4)
        assert adv.shape[0] == record["dynamic_kept_groups"]
        assert (adv.abs().sum(dim=1) > 0).all()  # every trained group carries signal
        if record["dynamic_extra_rounds"] < 4:
            assert adv.shape[0] == 8  # the batch was refilled to rolloutBatchSize groups
    # the rounds' own filter agrees with the published function
    for r in rounds:
        assert dynamic_sampling_keep(r.rewards, 4).tolist() == [bool(g.std() > 0) for g in r.rewards.view(-1, 4)]


def test_dynamic_sampling_off_keeps_every_group(tmp_path, assets, monkeypatch):
    records, updates, _, rounds = run_stage(tmp_path, assets, monkeypatch, steps=1)
    assert len(rounds) == 1 and updates[0]["advantages"].numel() == 32
    assert "dynamic_dropped_groups" not in records[0]


def test_overlong_mask_leaves_truncated_completions_out_of_the_loss(tmp_path, assets, monkeypatch):
    # a 16-token budget: the warm model's answers (about 20 tokens) are mostly cut off
    records, updates, _, rounds = run_stage(tmp_path, assets, monkeypatch, steps=1, max_len=16, overlong="mask")
    truncated = rounds[0].rollout.truncated
    assert 0 < truncated.sum() < truncated.numel(), truncated
    mask = updates[0]["batch"].loss_mask
    assert (mask[truncated].sum() == 0) and (mask[~truncated].sum(dim=1) > 0).all()


def test_soft_overlong_penalty_lowers_the_rewards_of_long_completions(tmp_path, assets, monkeypatch):
    records, updates, _, rounds = run_stage(tmp_path, assets, monkeypatch, steps=1, max_len=24,
                                            overlong="softPenalty", overlongBuffer=12)
    first = rounds[0]
    base = torch.tensor([r.reward for r in first.scored])
    penalty = soft_overlong_penalty(first.rollout.lengths, 24, 12)
    assert penalty.min() < 0  # some completion ran into the buffer
    assert torch.allclose(first.rewards, base + penalty)
    assert records[0]["reward_mean"] == pytest.approx(float((base + penalty).mean()), abs=1e-6)
