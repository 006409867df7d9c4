"""Benchmark loaders on fixture rows in each public schema, rule scoring, unit summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer.config import BenchmarkSpec, EvalSettings
from visionr1_trainer.data.formats import write_rows
from visionr1_trainer.data.synthetic import generate
from visionr1_trainer.eval.benchmarks import EvalItem, load_benchmark
from visionr1_trainer.eval.sampling import Sample, prompt_text, sample_with_retries
from visionr1_trainer.eval.scoring import score, summarize
from visionr1_trainer.eval.stage import compact_summary, evaluate_unit, metric_values, plan_units, Unit


def answer(text: str) -> str:
    return f"<think>working</think><answer> Final Answer:{text} </answer>"


def png(directory: Path, name: str, color=(200, 30, 30)) -> str:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(directory / "images" / name)
    return f"images/{name}"


def spec(name: str, fmt: str, source: Path, **data) -> BenchmarkSpec:
    return BenchmarkSpec.model_validate({"name": name, "format": fmt, "data": {"source": str(source), **data}})


def by_id(items: list[EvalItem]) -> dict[str, EvalItem]:
    return {item.id: item for item in items}


# --- MathVista ----------------------------------------------------------------------------


def mathvista_rows(d: Path) -> list[dict]:
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "img_height": 32, "img_width": 32, "language": "english", "source": "Geometry3K",
            "split": "testmini"}
    return [
        {"pid": "1", "question": "Find the measure of angle X.", "image": png(d, "1.png"), "decoded_image": None,
         "choices": ["145°", "165°", "155°", "175°"], "unit": None, "precision": None, "answer": "165°",
         "question_type": "multi_choice", "answer_type": "text",
         "metadata": {**meta, "task": "geometry problem solving",
                      "skills": ["geometry reasoning", "algebraic reasoning"]},
         "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
                  "end.\nQuestion: Find the measure of angle X.\nChoices:\n(A) 145°\n(B) 165°\n(C) 155°\n(D) 175°"},
        {"pid": "2", "question": "How many bars are there?", "image": png(d, "2.png"), "decoded_image": None,
         "choices": None, "unit": None, "precision": None, "answer": "3", "question_type": "free_form",
         "answer_type": "integer", "metadata": {**meta, "task": "figure question answering",
                                                 "skills": ["arithmetic reasoning", "statistical reasoning"]},
         "query": "Hint: Please answer the question requiring an integer answer.\nQuestion: How many bars are there?"},
        {"pid": "3", "question": "What is the work done, in J?", "image": png(d, "3.png"), "decoded_image": None,
         "choices": None, "unit": None, "precision": 1.0, "answer": "1.2", "question_type": "free_form",
         "answer_type": "float", "metadata": {**meta, "task": "textbook question answering",
                                               "skills": ["scientific reasoning"]},
         "query": "Hint: one decimal place.\nQuestion: What is the work done, in J?"},
        # broken rows: no image file; an answer that is none of the options
        {"pid": "4", "question": "q", "image": "images/missing.png", "choices": None, "answer": "1",
         "question_type": "free_form", "answer_type": "integer", "metadata": meta, "query": "q"},
        {"pid": "5", "question": "q", "image": png(d, "5.png"), "choices": ["1", "2"], "answer": "7",
         "question_type": "multi_choice", "answer_type": "text", "metadata": meta, "query": "q"},
    ]


@pytest.fixture
def mathvista(tmp_path) -> BenchmarkSpec:
    # The hub layout: data/testmini-*.parquet beside data/test-*.parquet; testmini is read.
    rows = mathvista_rows(tmp_path)
    write_rows(rows, tmp_path / "testmini.jsonl")
    write_rows([{**rows[1], "pid": "test-1"}], tmp_path / "test.jsonl")
    return spec("mathvista", "mathvista", tmp_path)


def test_mathvista_rows(mathvista):
    result = load_benchmark(mathvista)
    items = by_id(result.items)
    assert sorted(items) == ["1", "2", "3"]  # testmini only; broken rows skipped and counted
    assert dict(result.skipped) == {"missing_image": 1, "bad_answer": 1}
    mc = items["1"]
    assert (mc.answer, mc.multiple_choice, mc.choices[1]) == ("B", True, "165°")
    assert mc.question.startswith("Hint: Please answer") and mc.reference == "B (165°)"
    assert mc.categories == {"task": ["GPS"], "skill": ["GEO", "ALG"]}
    assert items["2"].categories == {"task": ["FQA"], "skill": ["ARI", "STA"]}
    assert (items["3"].answer_type, items["3"].precision) == ("float", 1)
    assert Path(mc.image_paths[0]).is_file() and mc.load_images()[0].size == (32, 32)


def test_mathvista_scoring_rules(mathvista):
    items = by_id(load_benchmark(mathvista).items)
    cases = [
        ("1", answer("165°"), "B", True), ("1", answer("(B)"), "B", True), ("1", answer("145"), "A", False),
        ("1", "no idea", None, False),
        ("2", answer("3.0"), "3.0", True), ("2", answer("4"), "4", False), ("2", "\\boxed{3}", "3", True),
        ("3", answer("1.23"), "1.23", True), ("3", answer("1.26"), "1.26", False),
        ("3", answer("\\frac{6}{5}"), "\\frac{6}{5}", True),  # not a plain number: math-verify decides
    ]
    for pid, completion, extracted, correct in cases:
        verdict = score(items[pid], completion)
        assert (verdict.extracted, verdict.correct) == (extracted, correct), (pid, completion)
    assert score(items["1"], answer("B")).format_ok and not score(items["1"], "B").format_ok
    assert score(items["2"], None).correct is False


def test_field_map_and_limit(tmp_path):
    rows = [{"qid": str(i), "prompt_text": "How many?", "img": png(tmp_path, f"{i}.png"), "label": str(i),
             "question_type": "free_form", "answer_type": "integer", "metadata": {"task": "math word problem"}}
            for i in range(4)]
    write_rows(rows, tmp_path / "custom.jsonl")
    ref = spec("custom", "mathvista", tmp_path / "custom.jsonl", limit=3,
               fieldMap={"pid": "qid", "question": "prompt_text", "image": "img", "answer": "label"})
    items = load_benchmark(ref).items
    assert [(it.id, it.answer, it.categories["task"]) for it in items] == [("0", "0", ["MWP"]), ("1", "1", ["MWP"]),
                                                                           ("2", "2", ["MWP"])]
    assert items[0].question == "Question: How many?"  # no query column: built from the question


# --- MathVerse ------------------------------------------------------------------------------


def test_mathverse_rows_versions_and_scoring(tmp_path):
    question = ("As shown in the figure, angle A = 80.0, angle B = 60.0, DE parallel BC, then the size of angle "
                "CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°")
    base = {"problem_index": "1", "answer": "D", "question_type": "multi-choice",
            "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}}
    rows = [
        {**base, "sample_index": "1", "problem_version": "Text Dominant", "question": question,
         "image": png(tmp_path, "v1.png"), "query_wo": "Please directly answer.\nQuestion: " + question,
         "query_cot": "Please first conduct reasoning.\nQuestion: " + question, "question_for_eval": question},
        {**base, "sample_index": "2", "problem_version": "Vision Only", "question": "",
         "image": png(tmp_path, "v5.png"), "query_wo": "According to the question shown in the image, answer.",
         "query_cot": "According to the question shown in the image, please first conduct reasoning.",
         "question_for_eval": question},
        {"sample_index": "3", "problem_index": "2", "problem_version": "Text Only", "answer": "2\\sqrt{3}",
         "question": "Find the length of AB.", "image": {"bytes": None, "path": None}, "question_type": "free-form",
         "metadata": {"split": "testmini", "source": "x", "subject": "Functions", "subfield": "Length"},
         "query_wo": "q", "query_cot": "Please reason.\nQuestion: Find the length of AB.",
         "question_for_eval": "Find the length of AB."},
    ]
    write_rows(rows, tmp_path / "testmini.jsonl")
    items = by_id(load_benchmark(spec("mathverse", "mathverse", tmp_path)).items)
    text, vision, text_only = items["1"], items["2"], items["3"]
    assert text.choices == ["40°", "60°", "120°", "140°"] and text.answer == "D"
    assert text.question.startswith("Please first conduct reasoning")
    assert vision.choices is None and vision.multiple_choice and vision.judge_question == question
    assert text_only.image_paths == [] and not text_only.multiple_choice
    assert text.categories == {"version": ["Text Dominant"], "subject": ["Plane Geometry"]}
    assert score(text, answer("140°")).correct and score(text, answer("D")).correct
    assert score(vision, answer("D")).correct and not score(vision, answer("140°")).correct  # no options to map
    assert score(text_only, answer("\\sqrt{12}")).correct and not score(text_only, answer("3")).correct


# --- MM-Math, DynaMath, synthetic ------------------------------------------------------------


def test_mmmath_rows(tmp_path):
    png(tmp_path, "mm1.png")
    rows = [
        {"question": "In the figure, find the area of the triangle.", "file_name": "mm1.png",
         "solution": "The base is 8 and the height 6, so the area is \\boxed{24}.", "year": "8th grade",
         "difficult": "medium", "knowledge": ["area of a triangle", "right triangles"]},
        {"question": "No answer anywhere.", "file_name": "mm1.png", "solution": "It is easy.", "year": "7th grade",
         "difficult": "easy", "knowledge": "angles"},
    ]
    write_rows(rows, tmp_path / "MM_Math.jsonl")
    result = load_benchmark(spec("mm-math", "mmmath", tmp_path / "MM_Math.jsonl"))
    assert dict(result.skipped) == {"empty_answer": 1}
    (item,) = result.items
    assert item.answer == "24" and item.image_paths  # found under images/
    assert item.categories == {"difficulty": ["medium"], "grade": ["8th grade"],
                               "knowledge": ["area of a triangle", "right triangles"]}
    assert score(item, "So the area is 24.\nThe answer is 24").correct


def test_dynamath_rows_tolerance_and_worst_case(tmp_path):
    mc_question = "Which function is shown?\nChoices:\n(A) sin x\n(B) cos x\n(C) tan x"
    circle = "What is the area of the circle?"
    rows = [
        {"id": "1", "qid": "1", "varid": "1", "question": circle, "image": png(tmp_path, "d1.png"),
         "ground_truth": "3.142", "answer_type": "float", "subject": "PG", "knowledge_level": "high school"},
        {"id": "1", "qid": "1", "varid": "2", "question": circle, "image": png(tmp_path, "d2.png"),
         "ground_truth": "12.566", "answer_type": "float", "subject": "PG", "knowledge_level": "high school"},
        {"id": "2", "qid": "2", "varid": "1", "question": mc_question, "image": png(tmp_path, "d3.png"),
         "ground_truth": "B", "answer_type": "multiple choice", "subject": "AL", "knowledge_level": "undergraduate"},
    ]
    write_rows(rows, tmp_path / "sample_variant.jsonl")  # VLMEvalKit's layout: qid and varid in one file
    items = load_benchmark(spec("dynamath", "dynamath", tmp_path / "sample_variant.jsonl")).items
    assert [it.id for it in items] == ["1-v1", "1-v2", "2-v1"] and [it.group for it in items] == ["1", "1", "2"]
    assert items[2].choices == ["sin x", "cos x", "tan x"] and items[2].answer == "B"
    assert score(items[0], answer("3.1419")).correct and score(items[0], answer("\\pi")).correct
    assert not score(items[0], answer("3.15")).correct
    completions = [answer("3.1416"), answer("12.7"), answer("cos x")]
    records = [{"correct": score(it, c).correct, "judged": None, "format_ok": True, "extracted": "x",
                "tokens": 5, "attempts": 1, "group": it.group, "categories": it.categories}
               for it, c in zip(items, completions)]
    summary = summarize(records)
    assert summary["accuracy"] == round(2 / 3, 4) and summary["n"] == 3
    assert summary["worstCaseAccuracy"] == 0.5 and summary["questions"] == 2  # qid 1 fails on variant 2
    assert summary["categories"]["subject:PG"] == {"accuracy": 0.5, "n": 2, "worstCaseAccuracy": 0.0}
    assert summary["categories"]["level:undergraduate"] == {"accuracy": 1.0, "n": 1, "worstCaseAccuracy": 1.0}


def test_synthetic_eval_split(tmp_path):
    generated = generate(tmp_path, n=5, n_eval=10, tasks=("color", "count"))
    result = load_benchmark(spec("synthetic", "synthetic", generated.root))  # the eval split of the directory
    assert len(result.items) == 10 and not result.skipped
    color = next(it for it in result.items if it.categories == {"task": ["color"]})
    assert color.multiple_choice and color.choices == ["red", "green", "blue", "yellow"]
    truth_text = color.choices["ABCD".index(color.answer)]
    assert score(color, answer(truth_text)).correct and score(color, answer(color.answer)).correct
    count = next(it for it in result.items if it.categories == {"task": ["count"]})
    assert not count.multiple_choice and score(count, f"\\boxed{{{count.answer}}}").correct


def test_unknown_format_names_the_valid_ones(tmp_path):
    bad = BenchmarkSpec.model_construct(name="x", format="mathvision", data=spec("x", "mathvista", tmp_path).data)
    with pytest.raises(ValueError, match="valid: dynamath, mathverse, mathvista, mmmath, synthetic"):
        load_benchmark(bad)


# --- retries and a unit's records and summary ------------------------------------------------


class ScriptedSampler:
    """Returns scripted completions per item id and attempt; records the calls."""

    def __init__(self, script: dict[str, list[str | None]]):
        self.script, self.calls = script, []

    def generate(self, items, seed):
        self.calls.append(([it.id for it in items], seed))
        out = []
        for it in items:
            attempt = sum(it.id in ids for ids, _ in self.calls) - 1
            text = self.script[it.id][min(attempt, len(self.script[it.id]) - 1)]
            out.append(Sample(None, error="prompt_too_long") if text is None else Sample(text, len(text.split())))
        return out

    def close(self):
        pass


def test_retries_until_answer_closes_and_counts_attempts(mathvista):
    items = load_benchmark(mathvista).items  # pids 1, 2, 3
    sampler = ScriptedSampler({
        "1": [answer("165°")],                                    # right first time
        "2": ["<think>long", "<think>long again", answer("3")],    # two retries, then right
        "3": ["<think>never closes", "<answer> Final Answer: 1.2"],  # gives up; last line still read
    })
    samples, attempts = sample_with_retries(sampler.generate, items, max_retries=2, seed=10)
    assert attempts == [1, 3, 3]
    assert [seed for _, seed in sampler.calls] == [10, 11, 12]  # each retry is a new draw
    assert sampler.calls[1][0] == ["2", "3"]

    settings = EvalSettings(max_retries=2)
    records = evaluate_unit(items, ScriptedSampler(sampler.script), settings, None, seed=10)
    assert [r["correct"] for r in records] == [True, True, True]
    assert [r["attempts"] for r in records] == [1, 3, 3]
    assert records[0]["prompt"] == prompt_text(items[0]) == items[0].question
    assert records[2]["format_ok"] is False and records[2]["extracted"] == "1.2"
    summary = summarize(records)
    assert summary["retries"] == 4 and summary["retriedSamples"] == 2
    assert summary["formatFailureRate"] == round(1 / 3, 4)
    assert summary["categories"]["task:GPS"] == {"accuracy": 1.0, "n": 1}

    # greedy decoding: no retries (a retry would repeat the same completion)
    greedy = evaluate_unit(items, ScriptedSampler(sampler.script), EvalSettings(temperature=0), None, seed=10)
    assert [r["attempts"] for r in greedy] == [1, 1, 1] and [r["correct"] for r in greedy] == [True, False, False]


def test_records_and_summary_agree(mathvista):
    items = load_benchmark(mathvista).items
    script = {"1": [answer("A")], "2": [None], "3": [answer("1.2")]}  # wrong, too long, right
    records = evaluate_unit(items, ScriptedSampler(script), EvalSettings(), None, seed=0)
    summary = summarize(records)
    assert summary["n"] == len(items) == 3
    assert summary["accuracy"] == round(sum(r["correct"] for r in records) / 3, 4) == round(1 / 3, 4)
    assert summary["promptsTooLong"] == 1 and records[1]["error"] == "prompt_too_long"
    assert records[1]["attempts"] == 1 and summary["retries"] == 0
    assert summary["reasoningLengthMean"] == round((records[0]["tokens"] + records[2]["tokens"]) / 2, 1)
    json.dumps(records)  # records are plain JSON


def test_units_names_metrics_and_compact_summary(tmp_path):
    from visionr1_trainer.config import EvalStageConfig

    def config(models, benchmarks=("mathvista", "dynamath")):
        return EvalStageConfig.model_validate({
            "run": "r", "stage": "eval", "outputUri": f"file://{tmp_path}/out",
            "storage": {"uri": f"file://{tmp_path}"},
            "model": {"name": "org/model"}, "models": models,
            "benchmarks": [{"name": b, "format": "mathvista", "data": {"source": "/x"}} for b in benchmarks],
            "eval": {}}, by_name=False)

    units = plan_units(config({"base": "base", "ptst-1": "file:///a"}))
    assert [u.name for u in units] == ["mathvista-base", "dynamath-base", "mathvista-ptst-1", "dynamath-ptst-1"]
    assert units[2].artifact == "units/mathvista-ptst-1" and units[2].records_file == "records-mathvista-ptst-1.jsonl"
    with pytest.raises(ValueError, match="models.bad/label"):
        plan_units(config({"bad/label": "base"}))
    with pytest.raises(ValueError, match="would share the name 'a-b-c'"):
        plan_units(config({"c": "base", "b-c": "base"}, benchmarks=("a-b", "a")))

    summary = {"accuracy": 0.5, "n": 10, "judgedAccuracy": 0.6, "formatFailureRate": 0.1, "retries": 3,
               "reasoningLengthMean": 12.5}
    assert metric_values(units[2], summary) == {
        "eval_mathvista_ptst_1_accuracy": 0.5, "eval_mathvista_ptst_1_judged_accuracy": 0.6,
        "eval_mathvista_ptst_1_samples": 10, "eval_mathvista_ptst_1_format_failure_rate": 0.1,
        "eval_mathvista_ptst_1_reasoning_length_mean": 12.5, "eval_mathvista_ptst_1_retries": 3}

    scores = {u.name: summary for u in units}
    compact = compact_summary(units, scores, "file:///out/results")
    assert compact["benchmarks"]["dynamath"]["ptst-1"] == {"accuracy": 0.5, "judgedAccuracy": 0.6, "n": 10}
    many = [Unit(u.benchmark.model_copy(update={"name": f"bench-{i}"}), f"label-{j}")
            for i, u in enumerate(units[:2] * 16) for j in range(6)]
    big = compact_summary(many, {u.name: summary for u in many}, "file:///out/results")
    assert len(json.dumps(big, separators=(",", ":"))) <= 3584
    assert "benchmarks" not in big or isinstance(big["benchmarks"]["bench-0"]["label-0"], list)


def test_hub_parquet_layout_from_s3(tmp_path, monkeypatch):
    """MathVista as the hub ships it (parquet, images inline as bytes), read from an s3:// prefix."""
    moto = pytest.importorskip("moto")
    import io

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buffer, format="PNG")
    rows = [{**row, "decoded_image": {"bytes": buffer.getvalue(), "path": f"{row['pid']}.png"},
             "image": f"images/{row['pid']}.jpg"} for row in mathvista_rows(tmp_path)[:3]]
    for row in rows:  # one type per column, as in the hub's parquet
        row["precision"] = float(row["precision"]) if row["precision"] is not None else None
    parquet = write_rows(rows, tmp_path / "hub" / "testmini-00000-of-00001.parquet")
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        s3.upload_file(str(parquet), "bench", "mathvista/data/testmini-00000-of-00001.parquet")
        s3.upload_file(str(parquet), "bench", "mathvista/data/test-00000-of-00001.parquet")
        source = BenchmarkSpec.model_validate({"name": "mathvista", "format": "mathvista",
                                               "data": {"source": "s3://bench/mathvista"}})
        result = load_benchmark(source, cache_dir=tmp_path / "cache")
    items = by_id(result.items)
    assert sorted(items) == ["1", "2", "3"] and not result.skipped  # testmini only
    assert items["1"].answer == "B" and items["1"].categories["skill"] == ["GEO", "ALG"]
    assert items["3"].precision == 1
    assert items["2"].load_images()[0].getpixel((0, 0)) == (0, 0, 255)  # the inline bytes, not images/2.jpg
