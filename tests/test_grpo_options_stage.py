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


pytestmark = pytest.mark.timeout(1800)  # whole stages on a shared CPU (100x slower under load)


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


def test_length_penalty_scales_correct_rewards_by_their_group_normalised_length(tmp_path, assets, monkeypatch):
    from visionr1_trainer.grpo.algos import group_length_penalty

    _, updates, _, rounds = run_stage(tmp_path, assets, monkeypatch, steps=1, lengthPenalty=0.5)
    first = rounds[0]
    hfrrf = torch.tensor([r.reward for r in first.scored])
    factor = group_length_penalty(first.rollout.lengths, hfrrf > 0, 4, 0.5)
    assert torch.allclose(first.rewards, hfrrf * factor)
    assert ((factor < 1) & (hfrrf > 0)).any()  # correct answers were penalised
    assert torch.equal(first.rewards[hfrrf == 0], hfrrf[hfrrf == 0])  # wrong ones untouched
    # among a group's correct answers the shorter one gets the larger reward
    for g in range(hfrrf.numel() // 4):
        rows = [r for r in range(4 * g, 4 * g + 4) if hfrrf[r] > 0]
        for a in rows:
            for b in rows:
                if first.rollout.lengths[a] < first.rollout.lengths[b]:
                    assert first.rewards[a] > first.rewards[b]


def test_reference_anchor_and_the_kl_to_the_cold_start_model(tmp_path, assets):
    """Stage 2 of a chain: stageStart anchors the KL at stage 1's output, coldStart at the
    cold-start model; the KL to the cold-start model is logged either way."""
    from visionr1_trainer.distributed import DistEnv
    from visionr1_trainer.grpo.trainer import load_models

    model, data = assets
    first = GRPOStageConfig.model_validate(grpo_config(tmp_path, model, data, steps=1, learningRate=5e-3,
                                                       saveEverySteps=100), by_name=False)
    trainer_mod.run(first)

    def second(reference: str) -> GRPOStageConfig:
        doc = grpo_config(tmp_path, model, data, stage=f"ptst-2-{reference.lower()}", index=2, steps=1,
                          init_uri=first.output_uri, saveEverySteps=100, reference=reference)
        doc["coldStartUri"] = f"file://{model}"
        return GRPOStageConfig.model_validate(doc, by_name=False)

    env = DistEnv(0, 1, 0, "cpu", None)
    from visionr1_trainer.models.loading import load_vlm

    warm, _, _ = load_vlm(str(model), "float32")
    stage1, _, _ = load_vlm(str(tmp_path / "store" / "default" / "t" / "ptst-1" / "model"), "float32")
    key = next(k for k in warm.state_dict() if "layers.0.mlp" in k and "vision" not in k and "visual" not in k)
    assert not torch.equal(warm.state_dict()[key], stage1.state_dict()[key])  # stage 1 moved the weights
    for reference, expected in (("stageStart", stage1), ("coldStart", warm)):
        _, _, ref, _, _, cold = load_models(second(reference), env, tmp_path / "w")
        weights = dict(ref._module.named_parameters())
        assert torch.equal(weights[key], expected.state_dict()[key]), reference
        assert (cold is ref) == (reference == "coldStart")  # one model when the anchor is the cold start
        assert torch.equal(dict(cold._module.named_parameters())[key], warm.state_dict()[key])

    logs = {}
    for reference in ("stageStart", "coldStart"):
        cfg = second(reference)
        trainer_mod.run(cfg)
        logs[reference] = read_jsonl(tmp_path / "store" / "default" / "t" / cfg.stage / "_work" / "metrics.jsonl")[0]
    # step 1: the policy is stage 1's model, so its KL to stage 1 is 0 and to the cold start is not
    assert logs["stageStart"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert logs["stageStart"]["kl_cold_start"] > 1e-5
    assert logs["coldStart"]["kl"] == pytest.approx(logs["coldStart"]["kl_cold_start"]) and logs["coldStart"]["kl"] > 1e-5
    assert logs["coldStart"]["kl_cold_start"] == pytest.approx(logs["stageStart"]["kl_cold_start"], rel=1e-4)


def test_each_ptst_stage_trains_on_its_data_slice(tmp_path, assets, monkeypatch):
    """The colour task's questions are all equally long, so a promptLength slice keeps file
    order: the first half is the red and green rows, the second blue and yellow."""
    model, data = assets
    seen = {}
    real_round = collect_mod.rollout_round
    for name, window in (("first", {"end": 0.5}), ("second", {"start": 0.5})):
        answers = seen.setdefault(name, set())

        def spy(state, examples, step, answers=answers):
            answers.update(ex.answer for ex in examples)
            return real_round(state, examples, step)

        monkeypatch.setattr(collect_mod, "rollout_round", spy)
        (tmp_path / name).mkdir()
        doc = grpo_config(tmp_path / name, model, data, steps=2, saveEverySteps=100)
        doc["ptst"]["dataSlice"] = {"by": "promptLength", **window}
        trainer_mod.run(GRPOStageConfig.model_validate(doc, by_name=False))
        start = read_jsonl(tmp_path / name / "store" / "default" / "t" / "ptst-1" / "_work" / "metrics.jsonl",
                           kind="start")[0]
        assert (start["examples"], start["rl_rows"]) == (16, 32)
    assert seen["first"] <= {"red", "green"} and seen["second"] <= {"blue", "yellow"}
    assert seen["first"] and seen["second"]
