"""The demo's figures: results.json from the eval records, and the same seed gives the same figures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from visionr1_trainer.models.tiny import build_tokenizer
from visionr1_trainer.results import ResultsError, model_figures, reasoning_text, run_results

ROOT = Path(__file__).resolve().parents[1]
# The base model's pretraining (visionr1_trainer.pretrain) at a few steps.
SMALL_PRETRAINING = {"samples": 16, "steps": 3, "batch_size": 4, "check_samples": 4}


def test_reasoning_text_is_inside_think_even_when_cut_off():
    assert reasoning_text("<think>a b</think><answer> Final Answer:A </answer>") == "a b"
    assert reasoning_text("<think>a b c") == "a b c"  # clipped by the budget: counts to the end
    assert reasoning_text("Final Answer:A") == ""


def test_figures_count_think_tokens_with_the_models_tokenizer(tmp_path):
    tok = build_tokenizer()
    records = [
        {"completion": "<think>Wait, let me check.</think><answer> Final Answer:A </answer>", "tokens": 12,
         "truncated": False},
        {"completion": "<think>Wait, wait", "tokens": 20, "truncated": True},
    ]
    figures = model_figures(records, {"accuracy": 0.5, "formatFailureRate": 0.5}, tok)
    think = [len(tok("Wait, let me check.", add_special_tokens=False)["input_ids"]),
             len(tok("Wait, wait", add_special_tokens=False)["input_ids"])]
    assert figures == {"accuracy": 0.5, "standard_error": 0.3536, "reasoning_tokens": sum(think) / 2,
                       "completion_tokens": 16.0, "clipped_ratio": 0.5, "perception": None, "n": 2,
                       "format_failure_rate": 0.5}


def test_paired_difference_counts_only_the_items_that_differ():
    from visionr1_trainer.results import paired_difference

    a = [{"id": str(i), "correct": c} for i, c in enumerate([True, False, False, True])]
    b = [{"id": str(i), "correct": c} for i, c in enumerate([True, True, True, False])]
    # d = 0, 1, 1, -1: mean 0.25, sample variance 0.9167, se sqrt(0.9167 / 4)
    assert paired_difference(a, b) == {"difference": 0.25, "standard_error": 0.4787, "n": 4}


def test_perception_is_the_first_larger_claim_whatever_the_final_answer():
    from visionr1_trainer.data.reflect import first_claim
    from visionr1_trainer.results import perception

    choices = ["red", "green", "blue", "yellow"]
    records = [
        # saw red, talked itself round to green: perceived right, answered wrong
        {"completion": "<think>I see a red circle and a green square. The red circle is larger. Wait, actually "
                       "the green square looks larger. So the answer is green, (B).</think>",
         "ground_truth": "A", "choices": choices},
        # the pretrained base model's direct answer
        {"completion": "The largest shape is the blue square; the red circle is smaller. The answer is (C).",
         "ground_truth": "C", "choices": choices},
        {"completion": "So the answer is red, (A).", "ground_truth": "A", "choices": choices},  # no claim
        {"completion": "<think>The yellow triangle is larger.</think>", "ground_truth": "A", "choices": choices},
    ]
    assert [first_claim(r["completion"]) for r in records] == ["red", "blue", None, "yellow"]
    assert perception(records) == 0.5
    assert perception([{"completion": "5", "ground_truth": "5", "choices": None}]) is None


def test_a_run_without_eval_results_says_so(tmp_path):
    with pytest.raises(ResultsError, match="no eval results"):
        run_results(tmp_path)


def micro_manifest(tmp: Path, inputs: Path, name: str) -> Path:
    """examples/tiny-cpu.yaml at a few steps per stage (the demo's settings otherwise)."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["model"]["name"] = f"file://{inputs}/base-model"
    spec["storage"]["uri"] = f"file://{tmp}/runs"
    spec["data"]["bridgeSource"]["source"] = f"file://{inputs}/bridge-source.jsonl"
    spec["data"]["rl"]["source"] = f"file://{inputs}/rl.jsonl"
    spec["data"]["benchmarks"][0]["data"]["source"] = f"file://{inputs}/eval.jsonl"
    stages = spec["stages"]
    stages["sft"].update(epochs=1)
    stages["ptst"] = [{"maxCompletionLength": 24, "numGenerations": 4, "steps": 2}]
    stages["eval"].update(maxTokens=24)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 8 stage processes; on two cores shared with others it took 16 min
def test_same_seed_same_figures(tmp_path):
    from visionr1_operator.local.display import RichDisplay
    from visionr1_operator.local.executor import execute, run_dir, with_local_storage
    from visionr1_operator.local.report import write_report
    from visionr1_operator.manifest import load_run
    from visionr1_trainer.demo import prepare

    inputs = prepare(tmp_path / "inputs", n=16, seed=0, n_eval=8, pretraining=SMALL_PRETRAINING)
    figures = []
    for name in ("first", "second"):
        run = with_local_storage(load_run(micro_manifest(tmp_path, inputs, name)), None)
        assert execute(run, RichDisplay(Console(file=io.StringIO(), width=120)), metrics_port=0) == 0
        write_report(run_dir(run))
        figures.append(json.loads((run_dir(run) / "report" / "results.json").read_text()))
    assert list(figures[0]["models"]) == ["base", "sft", "ptst-1"]
    for f in figures[0]["models"].values():
        assert 0 <= f["accuracy"] <= 1 and f["completion_tokens"] > 0 and f["n"] == 8
    assert figures[0] == figures[1]
