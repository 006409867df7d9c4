"""The plan: spec -> ordered stage configs, and the stage-config contract with the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifest import load_run
from visionr1_operator.plan import DEFAULT_TRAINER_IMAGE, build_plan
from visionr1_trainer.config import (
    ConfigError,
    EvalStageConfig,
    GRPOStageConfig,
    SFTStageConfig,
    load_stage_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_from(name: str) -> VisionR1Run:
    return load_run(EXAMPLES / name)


def test_tiny_plan_order_inputs_and_outputs():
    plans = build_plan(run_from("tiny-cpu.yaml"))
    assert [(p.name, p.kind) for p in plans] == [
        ("bridge", "bridge"), ("sft", "sft"), ("ptst-1", "grpo"), ("ptst-2", "grpo"), ("eval", "eval"),
    ]
    root = "file://./runs/default/tiny-cpu"
    assert [p.output_uri for p in plans] == [f"{root}/{p.name}" for p in plans]
    bridge, sft, ptst1, ptst2, ev = (p.config for p in plans)
    # Each stage reads what the one before it committed.
    assert sft.data_uri == f"{root}/bridge" and sft.data is None
    assert ptst1.init_uri == f"{root}/sft"
    assert ptst2.init_uri == f"{root}/ptst-1"
    assert (ptst1.ptst_index, ptst2.ptst_index, ptst2.ptst_total) == (1, 2, 2)
    assert (ptst1.ptst.max_completion_length, ptst1.ptst.num_generations) == (80, 16)
    assert (ptst2.ptst.max_completion_length, ptst2.ptst.num_generations) == (160, 8)
    # includeBaselines: base, SFT and every PTST stage are scored side by side.
    assert ev.models == {
        "base": "base", "sft": f"{root}/sft", "ptst-1": f"{root}/ptst-1", "ptst-2": f"{root}/ptst-2",
    }
    assert [b.name for b in ev.benchmarks] == ["synthetic"]


def test_stage_settings_carry_over_and_defaults_are_the_papers():
    plans = {p.name: p for p in build_plan(run_from("vision-r1-7b.yaml"))}
    sft = plans["sft"].config.sft
    assert (sft.epochs, sft.learning_rate, sft.lr_scheduler, sft.warmup_ratio) == (2, 5e-6, "cosine", 0.05)
    assert (sft.cutoff_length, sft.precision, sft.deepspeed_zero_stage) == (16384, "bf16", 3)
    grpo = plans["ptst-1"].config.grpo
    assert (grpo.epsilon_low, grpo.epsilon_high, grpo.beta, grpo.reward) == (0.2, 0.2, 0.01, "hfrrf")
    ev = plans["eval"].config.eval
    assert (ev.temperature, ev.top_p, ev.max_tokens) == (0.6, 0.95, 16000)
    assert [b.name for b in plans["eval"].config.benchmarks] == ["mathvista", "mathverse", "mm-math", "dynamath"]
    # Stage settings, not the cluster's: resources stay on the plan.
    assert "resources" not in plans["sft"].config_json()["sft"]
    assert plans["sft"].resources.gpus_per_node == 8


def test_default_ptst_is_4k_x16_then_8k_x8():
    doc = {
        "apiVersion": "visionr1.io/v1alpha1", "kind": "VisionR1Run", "metadata": {"name": "d"},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct"},
            "storage": {"uri": "s3://bucket/runs"},
            "data": {"coldStart": {"source": "Osilly/Vision-R1-cold"}, "rl": {"source": "Osilly/Vision-R1-rl"}},
            "stages": {"bridge": {"enabled": False}, "eval": {"enabled": False}},
        },
    }
    run = VisionR1Run.model_validate(doc, by_name=False)
    plans = build_plan(run)
    assert [p.name for p in plans] == ["sft", "ptst-1", "ptst-2"]
    shapes = [(p.config.ptst.max_completion_length, p.config.ptst.num_generations, p.config.ptst.steps)
              for p in plans[1:]]
    assert shapes == [(4096, 16, 100), (8192, 8, 100)]
    assert plans[0].config.data.source == "Osilly/Vision-R1-cold"
    assert all(p.image == DEFAULT_TRAINER_IMAGE for p in plans)
    assert plans[1].output_uri == "s3://bucket/runs/default/d/ptst-1"


def test_images_resolve_stage_then_spec_then_default():
    run = run_from("multinode.yaml")
    plans = {p.name: p for p in build_plan(run, default_image="fallback:1")}
    assert plans["sft"].image == "registry.example.com/ml/visionr1-trainer:0.1.0"
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"].pop("image")
    doc["spec"]["stages"]["eval"]["resources"]["image"] = "eval-image:2"
    plans = {p.name: p for p in build_plan(VisionR1Run.model_validate(doc), default_image="fallback:1")}
    assert plans["sft"].image == "fallback:1"
    assert plans["eval"].image == "eval-image:2"


def test_grpo_without_sft_starts_from_base_and_eval_scores_the_last_stage():
    run = run_from("tiny-cpu.yaml")
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["stages"]["bridge"]["enabled"] = False
    doc["spec"]["stages"]["sft"]["enabled"] = False
    doc["spec"]["stages"]["eval"]["includeBaselines"] = False
    doc["spec"]["data"].pop("bridgeSource")
    plans = build_plan(VisionR1Run.model_validate(doc, by_name=False))
    assert [p.name for p in plans] == ["ptst-1", "ptst-2", "eval"]
    assert plans[0].config.init_uri is None  # Vision-R1-Zero: RL straight from the base model
    assert plans[-1].config.models == {"ptst-2": "file://./runs/default/tiny-cpu/ptst-2"}


def test_for_attempt_changes_only_the_attempt():
    plan = build_plan(run_from("tiny-cpu.yaml"))[2]
    again = plan.for_attempt(3)
    assert again.config.attempt == 3 and plan.config.attempt == 1
    assert again.config.model_copy(update={"attempt": 1}) == plan.config


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_stage_config_json_round_trips_through_the_trainer_loader(tmp_path, example):
    """The contract: what the operator renders is what the trainer validates."""
    for plan in build_plan(run_from(example)):
        path = tmp_path / f"{plan.name}.json"
        path.write_text(json.dumps(plan.config_json()))
        loaded = load_stage_config(path, expected_kind=plan.kind)
        assert loaded == plan.config


def test_stage_config_loader_errors_name_file_and_field(tmp_path):
    plan = build_plan(run_from("tiny-cpu.yaml"))[2]
    cfg = plan.config_json()
    path = tmp_path / "stage.json"

    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"this is a 'grpo' stage config, expected 'sft'"):
        load_stage_config(path, expected_kind="sft")

    cfg["ptst"]["numGenerations"] = 1
    cfg["grpo"]["surprise"] = True
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_stage_config(path)
    text = str(err.value)
    assert f"{path}: ptst.numGenerations:" in text
    assert f"{path}: grpo.surprise: unknown field" in text

    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"stage.json:1:2: invalid JSON"):
        load_stage_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_stage_config(tmp_path / "missing.json")
    path.write_text(json.dumps({"kind": "train"}))
    with pytest.raises(ConfigError, match=r"kind: must be one of bridge, sft, grpo, eval, got 'train'"):
        load_stage_config(path)


def test_stage_configs_reject_snake_case_on_the_wire(tmp_path):
    cfg = build_plan(run_from("tiny-cpu.yaml"))[1].config_json()
    cfg["output_uri"] = cfg.pop("outputUri")
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_stage_config(path)
    assert "outputUri: required field is missing" in str(err.value)
    assert "output_uri: unknown field" in str(err.value)


def test_sft_config_needs_exactly_one_data_source():
    cfg = build_plan(run_from("tiny-cpu.yaml"))[1].config
    with pytest.raises(ValueError, match="exactly one of dataUri and data"):
        SFTStageConfig.model_validate({**cfg.to_json_dict(), "dataUri": None})
    assert isinstance(build_plan(run_from("tiny-cpu.yaml"))[2].config, GRPOStageConfig)
    assert isinstance(build_plan(run_from("tiny-cpu.yaml"))[-1].config, EvalStageConfig)
