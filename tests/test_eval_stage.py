"""The eval stage end to end on CPU: tiny Qwen2.5-VL models whose answers are known.

A "chain" model is the tiny Qwen2.5-VL with its attention and MLP outputs zeroed, so the
last hidden state is the current token's embedding, and an untied output layer that maps
each token of a fixed sequence to the next: whatever the image and question, it writes
that sequence (the vision tower, M-RoPE and the sampler still run for real). So every
score below is known in advance from the ground truths alone:

* ``three`` writes ``<think>ok</think><answer>Final Answer:3</answer>``;
* ``unclosed`` writes ``<think>ok</think><answer>Final Answer:5`` and stops, without
  ``</answer>``: every sample is retried ``maxRetries`` times and fails the format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionr1_trainer.config import EvalStageConfig
from visionr1_trainer.data.formats import write_rows
from visionr1_trainer.data.synthetic import generate
from visionr1_trainer.eval import stage as eval_stage
from visionr1_trainer.metrics import read_jsonl
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.tiny import build_tiny_vlm
from visionr1_trainer.runtime import StageStopped, request_stop, reset_stop
from visionr1_trainer.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
MAX_RETRIES = 2


def chain_model(source: Path, target: Path, words: list[str]) -> Path:
    """A copy of the tiny model at ``source`` that writes ``words`` (then EOS) after any prompt."""
    model, tok, image_processor = load_vlm(str(source), "float32")
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1, "the chat template's last prompt token must be one newline token"
    sequence = newline + [i for w in words for i in tok.encode(w, add_special_tokens=False)] + [tok.eos_token_id]
    assert len(set(sequence)) == len(sequence), "a chain needs distinct tokens"
    text = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visual" not in name and name.endswith(("o_proj.weight", "mlp.down_proj.weight")):
                param.zero_()  # the residual stream is the current token's embedding
        width = text.shape[1]
        basis, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(0)))
        head = torch.zeros_like(text)
        for i, (token, following) in enumerate(zip(sequence, sequence[1:])):
            text[token] = basis[i] * 3
            head[following] = basis[i] * 50  # logit margin in the hundreds: sampling cannot stray
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False
    model.save_pretrained(target)
    tok.save_pretrained(target)
    image_processor.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-assets")
    tiny = build_tiny_vlm(base / "tiny", seed=0)
    head = ["<think>", "ok", "</think>", "<answer>", "Final Answer:"]
    three = chain_model(tiny, base / "three", head + ["3", "</answer>"])
    unclosed = chain_model(tiny, base / "unclosed", head + ["5"])
    synthetic = generate(base / "synthetic", n=2, n_eval=10, tasks=("count", "color"))
    # Inside the benchmark's own directory: an image path that leaves it is refused (issue 18).
    image = base / "mathvista" / "images" / "eval-count-000000.png"
    image.parent.mkdir(parents=True)
    image.write_bytes((synthetic.root / "images" / "eval-count-000000.png").read_bytes())
    meta = {"task": "geometry problem solving", "skills": ["geometry reasoning"]}
    rows = [
        {"pid": "1", "question": "Which is x?", "image": str(image), "choices": ["1", "3", "5", "7"], "answer": "3",
         "question_type": "multi_choice", "answer_type": "text", "precision": None, "metadata": meta},
        {"pid": "2", "question": "How many?", "image": str(image), "choices": None, "answer": "3",
         "question_type": "free_form", "answer_type": "integer", "precision": None,
         "metadata": {"task": "figure question answering", "skills": ["arithmetic reasoning"]}},
        {"pid": "3", "question": "How long?", "image": str(image), "choices": None, "answer": "5.0",
         "question_type": "free_form", "answer_type": "float", "precision": 1.0, "metadata": meta},
    ]
    mathvista = write_rows(rows, base / "mathvista" / "testmini.jsonl")
    truths = [json.loads(line) for line in synthetic.eval.read_text().splitlines()]
    return {"three": three, "unclosed": unclosed, "synthetic": synthetic.root, "mathvista": mathvista.parent,
            "truths": truths}


def stage_config(tmp_path: Path, assets, models: dict[str, str], **eval_settings) -> EvalStageConfig:
    return EvalStageConfig.model_validate({
        "kind": "eval", "run": "t", "stage": "eval",
        "outputUri": f"file://{tmp_path}/store/default/t/eval",
        "storage": {"uri": f"file://{tmp_path}/store"},
        "model": {"name": f"file://{assets['three']}", "dtype": "float32"},
        "metricsPort": 0,
        "terminationMessagePath": str(tmp_path / "eval.termination"),
        "models": models,
        "benchmarks": [
            {"name": "synthetic", "format": "synthetic", "data": {"source": str(assets["synthetic"])}},
            {"name": "mathvista", "format": "mathvista", "data": {"source": str(assets["mathvista"])}},
        ],
        "eval": {"backend": "hf", "maxTokens": 16, "maxRetries": MAX_RETRIES, **eval_settings},
    }, by_name=False)


def committed_model_uri(tmp_path: Path, model_dir: Path, stage: str) -> str:
    """A PTST stage's output URI whose committed ``model`` artifact is ``model_dir``."""
    uri = f"file://{tmp_path}/store/default/t/{stage}"
    open_store(uri).commit_dir(model_dir, "model", {"stage": stage})
    return uri


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_known_answers_resumes_and_stops_between_units(tmp_path, assets, monkeypatch):
    models = {"base": "base", "ptst-1": committed_model_uri(tmp_path, assets["unclosed"], "ptst-1")}
    config = stage_config(tmp_path, assets, models)
    out = tmp_path / "store" / "default" / "t" / "eval"

    # 1. A stop requested once the first unit is committed: the stage stops between units.
    commit = eval_stage.commit_unit

    def commit_then_stop(*args, **kwargs):
        uri = commit(*args, **kwargs)
        request_stop()
        return uri

    monkeypatch.setattr(eval_stage, "commit_unit", commit_then_stop)
    try:
        with pytest.raises(StageStopped):
            eval_stage.run(config)
    finally:
        reset_stop()
    monkeypatch.setattr(eval_stage, "commit_unit", commit)
    assert sorted(p.name for p in (out / "units").iterdir()) == ["synthetic-base"]
    assert not (out / "results").exists()

    # 2. Run again: the committed unit is skipped, the other three are scored.
    scored = []
    evaluate_unit = eval_stage.evaluate_unit
    monkeypatch.setattr(eval_stage, "evaluate_unit",
                        lambda items, *a, **k: scored.append(len(items)) or evaluate_unit(items, *a, **k))
    summary = eval_stage.run(config)
    assert scored == [3, 10, 3]  # mathvista-base, then synthetic and mathvista for ptst-1

    # The known answers: "three" is right exactly where the truth is 3 (for multiple choice,
    # where option "3" is the truth); "unclosed" where it is 5, and it never has the format.
    truths = [row["answer"] for row in assets["truths"]]
    expected = {"base": truths.count("3") / 10, "ptst-1": truths.count("5") / 10}
    results = out / "results"
    full = json.loads((results / "summary.json").read_text())
    for label, accuracy in expected.items():
        unit = full["benchmarks"]["synthetic"][label]
        records = read_records(results / f"records-synthetic-{label}.jsonl")
        assert unit["accuracy"] == round(accuracy, 4) == round(sum(r["correct"] for r in records) / len(records), 4)
        assert unit["n"] == len(records) == 10 == len({r["id"] for r in records})
        assert summary["benchmarks"]["synthetic"][label] == {"accuracy": unit["accuracy"], "n": 10}
        count = [r for r in records if r["categories"] == {"task": ["count"]}]
        assert unit["categories"]["task:count"] == {
            "accuracy": round(sum(r["correct"] for r in count) / len(count), 4), "n": len(count)}
        assert unit["categories"]["task:color"]["accuracy"] == 0.0  # "3"/"5" name no colour option
    base = read_records(results / "records-synthetic-base.jsonl")
    assert {r["completion"] for r in base} == {"<think>ok</think><answer>Final Answer:3</answer>"}
    assert {r["extracted"] for r in base if r["choices"] is None} == {"3"}
    assert all(r["format_ok"] and r["attempts"] == 1 and r["tokens"] == 9 for r in base)
    stage1 = read_records(results / "records-synthetic-ptst-1.jsonl")
    assert {r["completion"] for r in stage1} == {"<think>ok</think><answer>Final Answer:5"}
    assert all(not r["format_ok"] and r["attempts"] == 1 + MAX_RETRIES and r["tokens"] == 8 for r in stage1)
    assert {r["extracted"] for r in stage1 if r["choices"] is None} == {"5"}  # read from the last line
    base_unit, stage1_unit = full["benchmarks"]["synthetic"]["base"], full["benchmarks"]["synthetic"]["ptst-1"]
    assert (base_unit["formatFailureRate"], base_unit["retries"], base_unit["reasoningLengthMean"]) == (0.0, 0, 9.0)
    assert (stage1_unit["formatFailureRate"], stage1_unit["retries"], stage1_unit["reasoningLengthMean"]) \
        == (1.0, 10 * MAX_RETRIES, 8.0)
    # MathVista: option "3" is B (right for "three"); integer 3; float 5.0 at one decimal
    mathvista = full["benchmarks"]["mathvista"]
    assert [r["correct"] for r in read_records(results / "records-mathvista-base.jsonl")] == [True, True, False]
    assert [r["correct"] for r in read_records(results / "records-mathvista-ptst-1.jsonl")] == [False, False, True]
    assert mathvista["base"]["categories"]["skill:GEO"] == {"accuracy": 0.5, "n": 2}
    assert mathvista["base"]["categories"]["task:FQA"] == {"accuracy": 1.0, "n": 1}

    # The compact summary: returned, at the output root, small; metrics for every unit.
    assert summary["artifactUri"] == f"{config.output_uri}/results"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert len(json.dumps(summary)) < 4096
    steps = read_jsonl(out / "_work" / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 1, 2, 3, 4]  # the first attempt's unit, then all four
    assert steps[-1]["eval_mathvista_ptst_1_accuracy"] == round(1 / 3, 4)
    assert any(s.get("eval_synthetic_base_accuracy") == round(expected["base"], 4) for s in steps)

    # 3. A third run finds every unit committed and loads no model.
    monkeypatch.setattr(eval_stage, "load_sampler", lambda *a: pytest.fail("no model should be loaded"))
    assert eval_stage.run(config) == summary


def test_vllm_backend_on_cpu_fails_clearly(tmp_path, assets):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = stage_config(tmp_path, assets, {"base": "base"}, backend="vllm")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU; use backend 'hf'"):
        eval_stage.run(config)


def test_vllm_engine_and_request_arguments():
    from visionr1_trainer.eval.sampling import MAX_PROMPT_TOKENS, vllm_engine_kwargs

    kwargs = vllm_engine_kwargs("/m", "/p", "bfloat16", 16000, gpus=4, seed=7)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["max_model_len"] == MAX_PROMPT_TOKENS + 16000
    assert (kwargs["model"], kwargs["tokenizer"], kwargs["dtype"], kwargs["seed"]) == ("/m", "/p", "bfloat16", 7)
    assert vllm_engine_kwargs("/m", "/m", "auto", 10, gpus=0, seed=0)["tensor_parallel_size"] == 1


# --- `visionr1 eval` ------------------------------------------------------------------------


def visionr1(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image")])}
    return subprocess.run([sys.executable, "-m", "visionr1_operator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_scores_two_models_and_prints_a_table(tmp_path, assets):
    out = tmp_path / "eval-out"
    done = visionr1("eval", "--model", str(assets["three"]), "--model", f"closed-not={assets['unclosed']}",
                    "--benchmark", f"syn=synthetic:{assets['synthetic']}", "--backend", "hf", "--max-tokens", "16",
                    "--max-retries", "1", "--dtype", "float32", "--output", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    truths = [row["answer"] for row in assets["truths"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["syn"]["three"]["accuracy"] == round(truths.count("3") / 10, 4)
    assert summary["benchmarks"]["syn"]["closed-not"]["accuracy"] == round(truths.count("5") / 10, 4)
    assert "syn" in done.stdout and "closed-not" in done.stdout and "three" in done.stdout
    assert f"{truths.count('3') / 10:.1%}"[:-1] in done.stdout.replace(" ", "")
    assert (out / "results" / "records-syn-three.jsonl").is_file()


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "syn=synthetic:."], "--model is required"),
    (["--model", ".", "--benchmark", "nonsense"], "--benchmark: expected NAME=FORMAT:SOURCE"),
    (["--model", ".", "--benchmark", "syn=mathvision:."], "format must be one of"),
    (["--model", "a=.", "--model", "a=.", "--benchmark", "syn=synthetic:."], "label 'a' is given twice"),
    (["--model", "Bad Label=.", "--benchmark", "syn=synthetic:."], "--model"),
    (["--model", "./no-such-dir", "--benchmark", "syn=synthetic:."], "no such file or directory"),
    (["--model", ".", "--benchmark", "syn=synthetic:.", "--max-tokens", "0"], "eval.maxTokens"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, args, message):
    done = visionr1("eval", *args, "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_reports_a_failed_stage(tmp_path, assets):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = visionr1("eval", "--model", str(assets["three"]), "--benchmark", f"syn=synthetic:{empty}",
                    "--backend", "hf", "--dtype", "float32", "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 1
    assert "error: eval failed (exit status 1): BenchmarksFailed: benchmark(s) syn failed" in done.stderr
    assert "DataSourceError" in done.stderr and "no parquet, jsonl or json" in done.stderr
