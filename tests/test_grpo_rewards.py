"""Rewards as plug-ins (issue 16, item 6): module:function in its own process, its time
bounded, an exception or a non-number scored 0 and counted, weighted sums, and a stage
that trains on a plug-in's reward."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from visionr1_trainer.config import GRPOSettings, GRPOStageConfig
from visionr1_trainer.grpo.reward import RewardResult
from visionr1_trainer.grpo.reward_plugins import PluginWorker, RewardScorer
from visionr1_trainer.runtime import UnusableSetting

from grpo_harness import build_warm_model, grpo_config, write_color_task

ROOT = Path(__file__).resolve().parents[1]
MOD = "grpo_reward_plugins"


def hfrrf(*values: float) -> list[RewardResult]:
    return [RewardResult(v, v > 0, v > 0, None, False) for v in values]


def scorer(reward="hfrrf", extra=(), timeout=2.0) -> RewardScorer:
    settings = GRPOSettings.model_validate(
        {"reward": reward, "extraRewards": [{"function": f, "weight": w} for f, w in extra],
         "rewardTimeoutSeconds": timeout}, by_name=False)
    return RewardScorer.from_settings(settings).start()


def test_weighted_sum_of_hfrrf_and_plugins_hand_computed():
    s = scorer(extra=[(f"{MOD}:length", 0.5), (f"{MOD}:echo_answer", -2.0)])
    try:
        rewards, stats = s(hfrrf(1.0, 0.0), ["a" * 50, "b" * 10], ["red", "blue"], ["what color", "x"])
    finally:
        s.close()
    # 1 + 0.5 * 0.5 - 2 * (3 + 0.5) = -5.75;  0 + 0.5 * 0.1 - 2 * 4 = -7.95
    assert rewards.tolist() == pytest.approx([-5.75, -7.95])
    assert stats == {"reward_plugin_errors": 0.0, "reward_plugin_timeouts": 0.0}


def test_hfrrf_alone_needs_no_process_and_is_unchanged():
    s = scorer()
    assert not s.workers
    rewards, stats = s(hfrrf(1.0, 0.0, 1.0), ["", "", ""], ["", "", ""], ["", "", ""])
    assert rewards.tolist() == [1.0, 0.0, 1.0] and stats == {}


def test_exceptions_and_non_numbers_score_zero_and_are_counted():
    s = scorer(reward=f"{MOD}:raises", extra=[(f"{MOD}:not_a_number", 1.0)])
    try:
        rewards, stats = s(hfrrf(0, 0, 0), ["boom", "fine", "nan"], ["a"] * 3, ["q"] * 3)
    finally:
        s.close()
    # raises: 0, 2, 2; not_a_number: every item fails (a str, or NaN) -> 0
    assert rewards.tolist() == [0.0, 2.0, 2.0]
    assert stats == {"reward_plugin_errors": 4.0, "reward_plugin_timeouts": 0.0}


def test_a_hanging_call_is_cut_off_at_its_bound_and_the_rest_still_scores():
    s = scorer(reward=f"{MOD}:hangs", timeout=0.5)
    try:
        started = time.monotonic()
        rewards, stats = s(hfrrf(0, 0, 0), ["ok", "hang", "ok"], ["a"] * 3, ["q"] * 3)
        assert time.monotonic() - started < 5
        assert rewards.tolist() == [3.0, 0.0, 3.0] and stats["reward_plugin_timeouts"] == 1.0
        again, _ = s(hfrrf(0), ["ok"], ["a"], ["q"])  # the worker is still usable
        assert again.tolist() == [3.0]
    finally:
        s.close()


def test_a_function_that_does_not_import_is_refused_naming_the_field():
    with pytest.raises(UnusableSetting, match=r"grpo.extraRewards\[0\].function: cannot use reward function "
                                               r"'no_such_module_x:f': ModuleNotFoundError"):
        scorer(extra=[("no_such_module_x:f", 1.0)])
    with pytest.raises(UnusableSetting, match="grpo.reward: .*AttributeError"):
        scorer(reward=f"{MOD}:no_such_function")


@pytest.mark.parametrize("doc", [{"reward": "not a name"}, {"extraRewards": [{"function": "mod.only"}]},
                                 {"rewardTimeoutSeconds": 0}])
def test_malformed_reward_settings_are_refused_naming_the_field(doc):
    field = next(iter(doc))
    with pytest.raises(Exception, match=field):
        GRPOSettings.model_validate(doc, by_name=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo-rewards")
    return build_warm_model(base / "model"), write_color_task(base / "data")


@pytest.mark.timeout(900)
def test_a_stage_trains_on_a_plugin_reward(tmp_path, assets):
    """A reward HFRRF does not give ("say red") is what the stage learns: the share of
    completions naming red rises, which HFRRF alone (right colour only) would not teach."""
    from visionr1_trainer.grpo.trainer import run
    from visionr1_trainer.metrics import read_jsonl

    doc = grpo_config(tmp_path, *assets, steps=16, saveEverySteps=100, rolloutBatchSize=8, seed=5,
                      learningRate=3e-3, reward=f"{MOD}:says_red")
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    run(cfg)
    records = read_jsonl(tmp_path / "store" / "default" / "t" / "ptst-1" / "_work" / "metrics.jsonl")
    rewards = [r["reward_mean"] for r in records]
    assert all(r["reward_plugin_errors"] == 0 for r in records)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last >= first + 0.25, rewards
    # accuracy (HFRRF's verdict) is still logged beside the plug-in's reward
    assert all("accuracy" in r for r in records)


def test_a_stage_with_an_unimportable_reward_exits_2_naming_the_field(tmp_path):
    doc = grpo_config(tmp_path, tmp_path / "model", tmp_path / "rl.jsonl", reward="no_such_module_x:f")
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "-m", "visionr1_trainer", "grpo", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "grpo.reward: cannot use reward function 'no_such_module_x:f'" in out.stderr
    assert "Traceback" not in out.stderr
