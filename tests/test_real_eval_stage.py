"""The eval stage with public benchmarks: one that fails fails alone, MathVista test writes its
submission file, baselines can be given the format instruction. The model is a scripted
sampler (the stage's sampling is covered by test_eval_stage with real tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer import __main__ as entry
from visionr1_trainer.config import EvalStageConfig
from visionr1_trainer.data.formats import write_rows
from visionr1_trainer.eval import stage as eval_stage
from visionr1_trainer.eval.sampling import Sample
from visionr1_trainer.storage import open_store


class Scripted:
    """Answers every prompt with ``text``; remembers the prompts it saw."""

    def __init__(self, text: str):
        self.text, self.prompts = text, []

    def generate(self, items, seed):
        self.prompts += [it.question for it in items]
        return [Sample(self.text, tokens=4) for _ in items]

    def close(self):
        pass


def mathvista_dir(root: Path, answers: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "1.png")
    rows = [{"pid": str(i), "question": f"How many? {i}", "image": "1.png", "choices": None, "unit": None,
             "precision": None, "answer": "3" if answers else "", "question_type": "free_form",
             "answer_type": "integer", "metadata": {"task": "figure question answering", "skills": []},
             "query": f"Hint: integer.\nQuestion: How many? {i}"} for i in (1, 2)]
    rows.append({**rows[0], "pid": "3", "choices": ["2", "3"], "question_type": "multi_choice",
                 "answer_type": "text", "answer": "3" if answers else None})
    write_rows(rows, root / ("testmini.jsonl" if answers else "test.jsonl"))
    return root


def config(tmp_path: Path, benchmarks: list[dict], models=None, **settings) -> EvalStageConfig:
    return EvalStageConfig.model_validate({
        "kind": "eval", "run": "t", "stage": "eval",
        "outputUri": f"file://{tmp_path}/store/default/t/eval", "storage": {"uri": f"file://{tmp_path}/store"},
        "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct"}, "metricsPort": 0,
        "terminationMessagePath": str(tmp_path / "termination"),
        "models": models or {"base": "base"}, "benchmarks": benchmarks,
        "eval": {"backend": "hf", "maxRetries": 0, **settings},
    }, by_name=False)


@pytest.fixture
def scripted(monkeypatch):
    sampler = Scripted("<think>ok</think><answer> Final Answer:3 </answer>")
    monkeypatch.setattr(eval_stage, "load_sampler", lambda cfg, label, work: (sampler, f"model-{label}"))
    return sampler


def test_a_benchmark_that_cannot_be_read_fails_alone(tmp_path, scripted):
    good = mathvista_dir(tmp_path / "mathvista")
    cfg = config(tmp_path, [
        {"name": "mmmath", "format": "mmmath", "data": {"source": str(good), "split": "test"}},  # no such split
        {"name": "mathvista", "format": "mathvista", "data": {"source": str(good)}},
    ])
    with pytest.raises(eval_stage.BenchmarksFailed, match="benchmark.s. mmmath failed.*split 'test'") as failed:
        eval_stage.run(cfg)
    table = failed.value.summary["benchmarks"]
    assert table["mathvista"]["base"] == {"accuracy": 1.0, "n": 3}
    assert "accuracy" not in table["mmmath"]["base"] and "split 'test'" in table["mmmath"]["base"]["error"]
    store = open_store(cfg.output_uri)
    results = json.loads(store.open_file("results", "summary.json"))
    assert "split 'test'" in results["benchmarks"]["mmmath"]["base"]["error"]
    assert results["benchmarks"]["mathvista"]["base"]["accuracy"] == 1.0
    assert store.is_committed("units/mathvista-base") and not store.is_committed("units/mmmath-base")
    # the run's figures (results.py, the local report) skip the failed benchmark
    from visionr1_trainer import results as run_figures

    fake = lambda text, add_special_tokens=False: {"input_ids": text.split()}  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_figures, "_tokenizer", lambda model_dir, cache: fake)
        figures = run_figures.run_results(tmp_path / "store" / "default" / "t")
    assert list(figures["benchmarks"]) == ["mathvista"] and figures["models"]["base"]["accuracy"] == 1.0


def test_the_termination_message_carries_the_scores_and_the_failure(tmp_path, scripted, monkeypatch):
    good = mathvista_dir(tmp_path / "mathvista")
    cfg = config(tmp_path, [
        {"name": "mathvista", "format": "mathvista", "data": {"source": str(good)}},
        {"name": "dynamath", "format": "dynamath", "data": {"source": str(tmp_path / "missing")}},
    ])
    path = tmp_path / "stage.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    monkeypatch.setattr(entry, "install_signal_handlers", lambda: None)
    assert entry.main(["eval", "--config", str(path)]) == 1
    message = json.loads((tmp_path / "termination").read_text())
    assert message["benchmarks"]["mathvista"]["base"]["accuracy"] == 1.0
    assert "does not exist" in message["benchmarks"]["dynamath"]["base"]["error"]
    assert message["error"].startswith("BenchmarksFailed: benchmark(s) dynamath failed")


def test_mathvista_test_predictions_only_writes_the_submission_file(tmp_path, scripted):
    test = mathvista_dir(tmp_path / "mathvista", answers=False)
    spec = {"name": "mathvista-test", "format": "mathvista", "data": {"source": str(test), "split": "test"}}
    with pytest.raises(eval_stage.BenchmarksFailed, match="predictionsOnly: true"):
        eval_stage.run(config(tmp_path / "a", [spec]))
    cfg = config(tmp_path / "b", [{**spec, "predictionsOnly": True}])
    compact = eval_stage.run(cfg)
    assert compact["benchmarks"]["mathvista-test"]["base"] == {"n": 3}
    submission = json.loads(open_store(cfg.output_uri).open_file("results", "submission-mathvista-test-base.json"))
    assert sorted(submission) == ["1", "2", "3"]
    first = submission["1"]
    assert first["response"].endswith("Final Answer:3 </answer>") and first["extraction"] == "3"
    assert first["question_type"] == "free_form" and first["answer_type"] == "integer" and "answer" not in first
    assert first["query"].startswith("Hint: integer.") and first["metadata"]["task"] == "figure question answering"
    assert submission["3"]["extraction"] == "3" and submission["3"]["choices"] == ["2", "3"]  # the option's text


def test_format_instruction_goes_to_the_named_baselines_only(tmp_path, scripted):
    good = mathvista_dir(tmp_path / "mathvista")
    bench = [{"name": "mathvista", "format": "mathvista", "data": {"source": str(good)}}]
    eval_stage.run(config(tmp_path / "off", bench))
    assert not any(eval_stage.FORMAT_INSTRUCTION in p for p in scripted.prompts)  # off by default
    scripted.prompts.clear()
    eval_stage.run(config(tmp_path / "on", bench, models={"base": "base", "trained": "/models/x"},
                          formatInstructionFor=["base"]))
    with_it = [p for p in scripted.prompts if p.endswith(eval_stage.FORMAT_INSTRUCTION)]
    assert len(with_it) == 3 and len(scripted.prompts) == 6  # base only, not the trained model
    with pytest.raises(ValueError, match="eval.formatInstructionFor: 'sft' is not a model label"):
        eval_stage.plan_units(config(tmp_path / "bad", bench, formatInstructionFor=["sft"]))


def test_a_split_that_names_no_file_is_a_bad_config_not_retried(tmp_path, scripted, monkeypatch):
    # A wrong split or subset cannot be fixed by a retry: exit 2 (the operator's "do not
    # retry" rule), still with the other benchmarks' scores in the termination message.
    good = mathvista_dir(tmp_path / "mathvista")
    cfg = config(tmp_path, [
        {"name": "mathvista", "format": "mathvista", "data": {"source": str(good)}},
        {"name": "mmmath", "format": "mmmath", "data": {"source": str(good), "split": "test"}},
    ])
    path = tmp_path / "stage.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    monkeypatch.setattr(entry, "install_signal_handlers", lambda: None)
    assert entry.main(["eval", "--config", str(path)]) == 2
    message = json.loads((tmp_path / "termination").read_text())
    assert message["benchmarks"]["mathvista"]["base"]["accuracy"] == 1.0
    assert "split 'test'" in message["benchmarks"]["mmmath"]["base"]["error"]
    assert "split 'test'" in message["error"]


def test_a_wrong_split_of_a_training_source_is_an_unusable_setting(tmp_path):
    from visionr1_trainer.data.sources import DataSourceError, resolve
    from visionr1_trainer.runtime import UnusableSetting

    good = mathvista_dir(tmp_path / "mathvista")
    with pytest.raises(UnusableSetting, match="split 'train'") as err:
        resolve(str(good), split="train")
    assert isinstance(err.value, DataSourceError)
