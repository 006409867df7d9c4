"""Validation during GRPO training (issue 16, item 7): the scoring against a hand
computation, the settings' validation, a whole CPU stage that validates every 2 steps
(metrics log, Prometheus, summary, and the same accuracy the eval stage's own sampler and
scorer give the committed model), and the report's GRPO plot."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from visionr1_trainer.config import GRPOStageConfig, GRPOValidation
from visionr1_trainer.eval.benchmarks import EvalItem, load_benchmark
from visionr1_trainer.eval.sampling import HFSampler, Sample, SamplingSettings
from visionr1_trainer.eval.scoring import score
from visionr1_trainer.grpo import validation as validation_mod
from visionr1_trainer.grpo.validation import due, record, validation_metrics, validation_spec
from visionr1_trainer.metrics import StageMetrics, read_jsonl
from visionr1_trainer.runtime import reset_stop

from grpo_harness import build_warm_model, grpo_config, write_color_task

pytestmark = pytest.mark.timeout(1800)  # a whole stage on a shared CPU


def _item(i: str, answer: str, **kw) -> EvalItem:
    return EvalItem(id=i, question="q", answer=answer, image_paths=[], **kw)


def test_validation_metrics_match_a_hand_count():
    items = [
        _item("a", "4"),
        _item("b", "red"),
        _item("c", "B", choices=["1", "2", "3"], multiple_choice=True, answer_type="choice"),
        _item("d", "\\frac{1}{2}"),
        _item("e", "7"),
    ]
    samples = [
        Sample("<think>2+2</think><answer> Final Answer: 4 </answer>", 10),  # right, format ok
        Sample("<think>x</think><answer> Final Answer: blue </answer>", 8),  # wrong, format ok
        Sample("<think>x</think><answer> Final Answer: B </answer>", 6, truncated=True),  # right
        Sample("the answer is \\boxed{0.5}", 4),  # right by math-verify, bad format
        Sample(None, error="prompt_too_long"),  # wrong, not run
    ]
    records = [record(it, s) for it, s in zip(items, samples)]
    assert [r["correct"] for r in records] == [True, False, True, True, False]
    assert [r["correct"] for r in records] == [score(it, s.text).correct for it, s in zip(items, samples)]
    out = validation_metrics(records)
    assert out["validation_accuracy"] == pytest.approx(3 / 5)
    assert out["validation_format_rate"] == pytest.approx(3 / 5)  # a, b, c in the strict format
    assert out["validation_length_mean"] == pytest.approx((10 + 8 + 6 + 4) / 4, abs=0.05)  # those that ran
    assert out["validation_truncated_rate"] == pytest.approx(1 / 5)
    assert out["validation_samples"] == 5


def test_due_every_n_steps_and_off_by_default(tmp_path):
    doc = grpo_config(tmp_path, tmp_path, tmp_path / "rl.jsonl")
    off = GRPOStageConfig.model_validate(doc, by_name=False)
    assert off.grpo.validation.every_steps == 0 and validation_spec(off) is None
    assert not any(due(off, s) for s in range(1, 10))
    doc["grpo"]["validation"] = {"everySteps": 2, "data": {"source": "x.jsonl"}}
    on = GRPOStageConfig.model_validate(doc, by_name=False)
    assert [s for s in range(1, 9) if due(on, s)] == [2, 4, 6, 8]
    assert validation_spec(on).format == "synthetic"


@pytest.mark.parametrize("settings, field", [
    ({"everySteps": 2}, "everySteps"),
    ({"everySteps": 2, "benchmark": "mv", "data": {"source": "x"}}, "everySteps"),
    ({"everySteps": -1, "data": {"source": "x"}}, "everySteps"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(Exception) as err:
        GRPOValidation.model_validate(settings, by_name=False)
    assert field in str(err.value)


def test_a_named_benchmark_must_be_handed_to_the_stage(tmp_path):
    doc = grpo_config(tmp_path, tmp_path, tmp_path / "rl.jsonl")
    doc["grpo"]["validation"] = {"everySteps": 2, "benchmark": "mv"}
    with pytest.raises(Exception, match="validationBenchmark"):
        GRPOStageConfig.model_validate(doc, by_name=False)
    doc["validationBenchmark"] = {"name": "mv", "format": "synthetic", "data": {"source": "x.jsonl"}}
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    assert validation_spec(cfg).name == "mv"


def test_an_unreadable_split_exits_2_naming_the_field(tmp_path):
    from visionr1_trainer.runtime import UnusableSetting

    doc = grpo_config(tmp_path, tmp_path, tmp_path / "rl.jsonl")
    doc["grpo"]["validation"] = {"everySteps": 2, "data": {"source": str(tmp_path / "missing.jsonl")}}
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    with pytest.raises(UnusableSetting, match="grpo.validation.data"):
        validation_mod.load_validation_items(cfg)


# --- a whole stage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo-validation")
    return build_warm_model(base / "model"), write_color_task(base / "data", per_color=3)


def test_a_stage_validates_every_2_steps(tmp_path, assets, monkeypatch):
    reset_stop()
    model, data = assets
    doc = grpo_config(tmp_path, model, data, steps=4, saveEverySteps=100,
                      validation={"everySteps": 2, "data": {"source": str(data)}, "limit": 8, "maxTokens": 24})
    cfg = GRPOStageConfig.model_validate(doc, by_name=False)
    seen: list[StageMetrics] = []
    real_start = StageMetrics.start

    def spy_start(self):
        seen.append(self)
        return real_start(self)

    monkeypatch.setattr(StageMetrics, "start", spy_start)
    from visionr1_trainer.grpo import trainer as trainer_mod

    summary = trainer_mod.run(cfg)
    stage_dir = tmp_path / "store" / "default" / "t" / "ptst-1"
    steps = read_jsonl(stage_dir / "_work" / "metrics.jsonl")
    validated = {r["step"]: r for r in steps if "validation_accuracy" in r}
    assert sorted(validated) == [2, 4]  # and not at steps 1, 3
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one line per step, validation in it
    for r in validated.values():
        assert r["validation_samples"] == 8 and 0 <= r["validation_accuracy"] <= 1
        assert r["validation_step"] == r["step"]
    # Prometheus: the gauge holds the last validation
    gauge = seen[0].registry.get_sample_value("visionr1_validation_accuracy", {"run": "t", "stage": "ptst-1"})
    assert gauge == pytest.approx(validated[4]["validation_accuracy"])
    # the status summary (the termination message __main__ writes, and <output>/summary.json)
    assert summary["validationAccuracy"] == pytest.approx(validated[4]["validation_accuracy"], abs=1e-4)
    assert summary["validationStep"] == 4
    assert json.loads((stage_dir / "summary.json").read_text())["validationAccuracy"] == summary["validationAccuracy"]
    # Independently: the eval stage's own sampler (greedy) and scorer on the committed model
    # (the weights of step 4) give the accuracy validation logged at step 4.
    spec = validation_spec(cfg)
    items = load_benchmark(spec).items[:8]
    committed = json.loads((stage_dir / "summary.json").read_text())["artifactUri"].removeprefix("file://")
    sampler = HFSampler(committed, committed, "float32", "eager", "cpu", SamplingSettings(24, 0.0, 1.0))
    texts = [s.text for s in sampler.generate(items, seed=0)]
    expected = sum(score(it, t).correct for it, t in zip(items, texts)) / len(items)
    assert validated[4]["validation_accuracy"] == pytest.approx(expected)
    assert 0 < expected  # the warm model is right on some items: not 0 == 0


def test_the_report_plots_validation_accuracy(tmp_path, monkeypatch):
    from visionr1_operator.local import report

    logs = {"ptst-1": [{"step": s, "reward_mean": 0.1 * s, "completion_length_mean": 10.0,
                        **({"validation_accuracy": 0.2 * s} if s % 2 == 0 else {})} for s in range(1, 5)],
            "ptst-2": [{"step": s, "reward_mean": 0.5, "completion_length_mean": 9.0} for s in range(1, 3)]}
    data = SimpleNamespace(status=SimpleNamespace(stages=[SimpleNamespace(kind="grpo", name=n) for n in logs]),
                           logs=logs)
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    report.plot_ptst(data, tmp_path)
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    curve = lines["ptst-1 validation accuracy"]
    assert list(curve.get_xdata()) == [2, 4] and list(curve.get_ydata()) == pytest.approx([0.4, 0.8])
    assert "ptst-2 validation accuracy" not in lines  # a stage without validation draws none


def test_the_plan_hands_each_ptst_stage_the_named_benchmark(tmp_path):
    from pathlib import Path

    from visionr1_operator.api import VisionR1Run
    from visionr1_operator.manifest import load_run
    from visionr1_operator.plan import build_plan
    from visionr1_trainer.config import load_stage_config

    run = load_run(Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.yaml")
    assert all(p.config.validation_benchmark is None for p in build_plan(run) if p.kind == "grpo")  # off by default
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["stages"]["grpo"]["validation"] = {"everySteps": 5, "benchmark": "synthetic", "limit": 16}
    grpo = [p for p in build_plan(VisionR1Run.model_validate(doc, by_name=False)) if p.kind == "grpo"]
    assert len(grpo) == 2
    for plan in grpo:
        assert plan.config.validation_benchmark == run.spec.data.benchmarks[0]
        path = tmp_path / f"{plan.name}.json"
        path.write_text(plan.config.model_dump_json(by_alias=True))
        loaded = load_stage_config(path, "grpo")
        assert validation_spec(loaded).name == "synthetic" and loaded.grpo.validation.limit == 16
