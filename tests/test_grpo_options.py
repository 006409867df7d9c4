"""The GRPO options of issue 16 (Dr. GRPO, GSPO, DAPO's dynamic sampling and overlong
handling, the length penalty) against independent hand computations on small tensors,
plus their settings' validation."""

from __future__ import annotations

import math

import pytest
import torch

from visionr1_trainer.config import GRPOSettings, GRPOStageConfig, ConfigError, load_stage_config
from visionr1_trainer.grpo.algos import (
    dynamic_sampling_keep,
    group_advantages,
    group_length_penalty,
    mask_truncated,
    policy_loss,
    soft_overlong_penalty,
)
from visionr1_trainer.grpo.batch import aggregation_weight, micro_batches


# --- Dr. GRPO --------------------------------------------------------------------------------


def test_scale_none_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0])
    adv = group_advantages(rewards, 4, scale="none")
    # group 1: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; group 2: mean 0.5 -> [0, 0, 0.5, -0.5]
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.5, -0.5])
    # the default is unchanged: divided by the group's sample std (+ eps)
    s = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)
    assert group_advantages(rewards, 4)[0].item() == pytest.approx(0.75 / (s + 1e-4))


def test_unknown_scale_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, std"):
        group_advantages(torch.zeros(4), 2, scale="batch")


def test_dr_grpo_sums_and_divides_by_sequences_times_width():
    # ratio 1 (old == current), no KL: per-token loss is -A on real tokens.
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, _ = policy_loss(lp, lp, None, adv, mask, beta=0.0, aggregation="dr_grpo")
    # masked sum: 3 * (-1) + 1 * (+2) = -1; divisor 2 sequences x 4 columns = 8
    assert loss.item() == pytest.approx(-1 / 8)
    # sequence_mean for contrast: mean(-1, 2) = 0.5
    assert policy_loss(lp, lp, None, adv, mask, beta=0.0)[0].item() == pytest.approx(0.5)
    # a wider pad changes the divisor only: the trainer pads to maxCompletionLength
    wide, _ = policy_loss(torch.zeros(2, 8), torch.zeros(2, 8), None, adv,
                          torch.nn.functional.pad(mask, (0, 4)), beta=0.0, aggregation="dr_grpo")
    assert wide.item() == pytest.approx(-1 / 16)


def test_dr_grpo_micro_batches_accumulate_to_the_full_loss():
    torch.manual_seed(0)
    lp = torch.randn(6, 5, requires_grad=True)
    old, ref, adv = lp.detach() + 0.1 * torch.randn(6, 5), lp.detach() + 0.1, torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[2] = 0
    full, _ = policy_loss(lp, old, ref, adv, mask, aggregation="dr_grpo")
    rows = list(range(6))
    acc = sum(policy_loss(lp[m], old[m], ref[m], adv[m], mask[m], aggregation="dr_grpo")[0]
              * aggregation_weight(mask, m, rows, "dr_grpo") for m in micro_batches(rows, 4))
    assert torch.allclose(acc, full, atol=1e-7)


# --- GSPO ------------------------------------------------------------------------------------


def test_sequence_importance_ratio_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -9.0], [-1.5, -1.5, -1.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    loss, stats = policy_loss(lp, old, None, adv, mask, beta=0.0, importance="sequence",
                              epsilon_low=0.2, epsilon_high=0.2)
    # row 0: mean(0.2, -0.1) = 0.05 -> s = e^0.05 = 1.0513 (inside the clip range)
    # row 1: mean(0.5, 0.5, 0.5) = 0.5 -> s = e^0.5 = 1.6487, clipped to 1.2 for A > 0
    s0, s1 = math.exp(0.05), 1.2
    # sequence_mean: each row's tokens all carry -s * A; the mean over rows
    assert loss.item() == pytest.approx(-(s0 + s1) / 2, rel=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(3 / 5)  # row 1's three tokens
    loss.backward()
    # row 0's gradient: d(-s0/2)/d lp_t = -s0/2 * (1/2) on its two real tokens, 0 on padding;
    # row 1 is clipped: no gradient
    assert lp.grad[0].tolist() == pytest.approx([-s0 / 4, -s0 / 4, 0.0], rel=1e-6)
    assert lp.grad[1].abs().sum().item() == 0.0


def test_token_and_sequence_agree_when_the_policy_has_not_moved():
    torch.manual_seed(1)
    lp, ref = torch.randn(3, 4), torch.randn(3, 4)
    mask, adv = torch.ones(3, 4), torch.randn(3)
    a, _ = policy_loss(lp, lp, ref, adv, mask)
    b, _ = policy_loss(lp, lp, ref, adv, mask, importance="sequence")
    assert a.item() == pytest.approx(b.item())  # KL per token either way


def test_unknown_importance_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: sequence, token"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1),
                    beta=0.0, importance="seq")


# --- DAPO: dynamic sampling, overlong ---------------------------------------------------------------


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert dynamic_sampling_keep(rewards, 3).tolist() == [False, False, True, False]
    assert dynamic_sampling_keep(rewards, 4).tolist() == [True, True, False]
    with pytest.raises(ValueError):
        dynamic_sampling_keep(rewards, 5)


def test_soft_overlong_penalty_hand_computed():
    # L_max 20, L_cache 8: no penalty up to 12 tokens, then -(len - 12) / 8, -1 at 20 and beyond
    lengths = torch.tensor([5, 12, 13, 16, 20, 25])
    assert soft_overlong_penalty(lengths, 20, 8).tolist() == pytest.approx([0, 0, -1 / 8, -0.5, -1, -1])
    assert soft_overlong_penalty(lengths, 20, 8, factor=0.5).tolist() == pytest.approx(
        [0, 0, -1 / 16, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError):
        soft_overlong_penalty(lengths, 20, 0)


def test_mask_truncated_zeroes_the_rows_that_hit_the_cap():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    out = mask_truncated(mask, torch.tensor([True, False, False]))
    assert out.tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]] and out.dtype == mask.dtype


# --- Arora and Zanette's length penalty -------------------------------------------------------------


def test_group_length_penalty_hand_computed():
    lengths = torch.tensor([10, 20, 30, 99, 7, 8, 9, 10])
    correct = torch.tensor([True, True, True, False, True, False, False, False])
    factor = group_length_penalty(lengths, correct, 4, alpha=0.2)
    # group 1: correct lengths 10, 20, 30: mean 20, population std sqrt(200/3)
    sd = math.sqrt(200 / 3)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [1 - 0.2 * sig(-10 / sd), 1 - 0.2 * 0.5, 1 - 0.2 * sig(10 / sd), 1.0,
                1 - 0.2 * 0.5, 1.0, 1.0, 1.0]  # group 2: one correct completion: sigmoid(0)
    assert factor.tolist() == pytest.approx(expected, rel=1e-6)


# --- the settings -----------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    s = GRPOSettings()
    assert (s.loss_aggregation, s.advantage_scale, s.importance_sampling, s.dynamic_sampling, s.overlong) == (
        "sequence_mean", "std", "token", False, "none")


@pytest.mark.parametrize("field,value", [("advantageScale", "batch"), ("importanceSampling", "seq"),
                                         ("lossAggregation", "sum"), ("overlong", "cut"),
                                         ("dynamicSamplingMaxRounds", 0)])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(Exception, match=field):
        GRPOSettings.model_validate({field: value}, by_name=False)


def test_soft_penalty_needs_a_buffer_that_fits_the_stage(tmp_path):
    with pytest.raises(Exception, match="overlongBuffer"):
        GRPOSettings.model_validate({"overlong": "softPenalty"}, by_name=False)
    from grpo_harness import grpo_config
    import json

    doc = grpo_config(tmp_path, tmp_path, tmp_path / "rl.jsonl", overlong="softPenalty", overlongBuffer=100)
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"grpo.overlongBuffer: 100 is above maxCompletionLength \(24\)"):
        load_stage_config(path)
    doc["grpo"]["overlongBuffer"] = 8
    path.write_text(json.dumps(doc))
    assert isinstance(load_stage_config(path), GRPOStageConfig)


# --- FastCuRL data slices --------------------------------------------------------------------------


def test_curriculum_slice_hand_computed():
    from visionr1_trainer.grpo.algos import curriculum_slice

    keys = torch.tensor([30, 10, 20, 10, 50, 40])  # ranks: 1 (10), 3 (10), 2 (20), 0 (30), 5 (40), 4 (50)
    assert curriculum_slice(keys, 0.0, 0.5).tolist() == [1, 2, 3]  # the three shortest, in file order
    assert curriculum_slice(keys, 0.5, 1.0).tolist() == [0, 4, 5]
    assert curriculum_slice(keys, 0.0, 1.0).tolist() == list(range(6))
    assert curriculum_slice(keys, 0.0, 0.2).tolist() == [1]  # the tie 10/10 keeps file order
    with pytest.raises(ValueError):
        curriculum_slice(keys, 0.5, 0.5)


def test_data_slice_validation_names_the_field():
    from visionr1_trainer.config import PTSTStage

    with pytest.raises(Exception, match=r"dataSlice[\s\S]*end: 0.3 is not above start \(0.5\)"):
        PTSTStage.model_validate({"maxCompletionLength": 16, "numGenerations": 2,
                                  "dataSlice": {"start": 0.5, "end": 0.3}}, by_name=False)
    with pytest.raises(Exception, match="by"):
        PTSTStage.model_validate({"maxCompletionLength": 16, "numGenerations": 2,
                                  "dataSlice": {"by": "difficulty"}}, by_name=False)


# --- scoring with the shared prompt prefix (grpo.sharedPrefix) ---------------------------------


def test_shared_prefix_auto_is_off_under_zero3_and_with_activation_checkpointing():
    from visionr1_trainer.grpo.engine import EngineSpec
    from visionr1_trainer.grpo.trainer import shared_prefix_on
    from visionr1_trainer.runtime import UnusableSetting

    def spec(zero, ckpt=False):
        return EngineSpec(zero, "fp32", 4, 1.0, 1e-6, activation_checkpointing=ckpt)

    assert [shared_prefix_on("auto", spec(z)) for z in (0, 1, 2, 3)] == [True, True, True, False]
    assert shared_prefix_on("on", spec(3)) and not shared_prefix_on("off", spec(0))
    assert not shared_prefix_on("auto", spec(0, ckpt=True))  # checkpointed layers keep no KV cache
    with pytest.raises(UnusableSetting, match="grpo.sharedPrefix: on needs the layers' KV cache"):
        shared_prefix_on("on", spec(0, ckpt=True))


def test_shared_prefix_on_with_activation_checkpointing_on_is_refused_naming_the_field():
    with pytest.raises(Exception, match="sharedPrefix"):
        GRPOSettings.model_validate({"sharedPrefix": "on", "activationCheckpointing": "on"}, by_name=False)
    with pytest.raises(Exception, match="sharedPrefix"):
        GRPOSettings.model_validate({"sharedPrefix": "always"}, by_name=False)
    assert GRPOSettings.model_validate({"sharedPrefix": "on", "activationCheckpointing": "auto"}, by_name=False)


def test_a_micro_batch_without_two_rows_of_one_prompt_is_scored_in_one_forward(tmp_path):
    """Nothing to share: the prompt's own pass would only be a second pass through the model
    (under ZeRO-3 a second gather of every layer). Rows of one prompt: the prefix once, then
    the completions on its cache (two calls)."""
    from visionr1_trainer.grpo.batch import build_policy_batch, sequence_logprobs
    from visionr1_trainer.grpo.logprob_head import LogprobModel
    from visionr1_trainer.grpo.rollout import finish_rollout
    from visionr1_trainer.grpo.sampler import generate_groups
    from visionr1_trainer.models.loading import load_vlm
    from visionr1_trainer.models.tiny import build_tiny_vlm
    from visionr1_trainer.models.vlm import IMAGE_TOKEN, encode_prompts

    model, tok, ip = load_vlm(str(build_tiny_vlm(tmp_path / "m")), "float32")
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode_prompts(tok, ip, ["What color?", "And this one, please?"], [[], []], 64)
    torch.manual_seed(0)
    ids, _, secs = generate_groups(model, enc, 2, 6, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id, image)
    batch = build_policy_batch(enc, [0, 0], finish_rollout(ids, tok, 6, secs), 2, tok, image)
    policy, calls = LogprobModel(model), []
    counting = lambda **inputs: calls.append(sorted(inputs)) or policy(**inputs)  # noqa: E731
    with torch.no_grad():
        one_each, _ = sequence_logprobs(counting, batch, [0, 2], 1.0, "cpu")  # rows of prompts 0 and 1
        assert len(calls) == 1 and "targets" in calls[0]
        calls.clear()
        shared, _ = sequence_logprobs(counting, batch, [0, 1], 1.0, "cpu")  # both rows of prompt 0
        assert len(calls) == 2 and "past_key_values" in calls[1]
        full, _ = sequence_logprobs(policy, batch, [0, 1], 1.0, "cpu", shared_prefix=False)
    mask = batch.loss_mask[[0, 1]].bool()
    assert torch.allclose(shared[mask], full[mask], atol=1e-5)
    assert one_each.shape == (2, batch.completion_len)
