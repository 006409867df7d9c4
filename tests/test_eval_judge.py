"""The LLM judge against a local OpenAI-compatible server: 429/500 first, then verdicts."""

from __future__ import annotations

import collections
import json
import logging

import pytest
from fake_openai import FakeOpenAIServer

from visionr1_trainer.bridge.backends import openai_api
from visionr1_trainer.config import EvalStageConfig, JudgeSpec
from visionr1_trainer.data.synthetic import generate
from visionr1_trainer.eval import stage as eval_stage
from visionr1_trainer.eval.benchmarks import EvalItem
from visionr1_trainer.eval.judge import JUDGE_API_KEY_ENV, Judge, judge_prompt, parse_verdict
from visionr1_trainer.eval.sampling import Sample
from visionr1_trainer.metrics import read_jsonl

KEY = "judge-key-5f3a9c0e"


class FakeJudge(FakeOpenAIServer):
    """Chat completions that fail with 429, then 500, then answer; the verdict is scripted.

    A prompt whose response part holds ``Final Answer:<reference>`` is Correct, one that
    holds ``GARBAGE`` gets an answer that is no verdict, anything else is Incorrect.
    """

    def __init__(self, failures=(429, 500)):
        self.failures = list(failures)
        self.attempts: collections.Counter = collections.Counter()
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        super().__init__()

    def handle(self, handler, body):
        prompt = body["messages"][0]["content"]
        with self.lock:
            self.auth.append(handler.headers.get("Authorization"))
            self.bodies.append(body)
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
        if handler.path != "/v1/chat/completions":
            return self.reply(handler, 404, {"error": "wrong path"})
        if attempt < len(self.failures):
            status = self.failures[attempt]
            return self.reply(handler, status, {"error": {"message": "scripted"}},
                              {"Retry-After": "0"} if status == 429 else {})
        reference = prompt.split("Reference answer: ", 1)[1].split("\n", 1)[0].split(" ")[0]
        response = prompt.split("The end of the model's response:", 1)[1]
        if "GARBAGE" in response:
            verdict = "I would rather not say."
        elif f"Final Answer:{reference} " in response:
            verdict = "Correct"
        else:
            verdict = "**Incorrect.** The values differ."
        self.reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": verdict}}]})


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setattr(openai_api, "BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.setenv(JUDGE_API_KEY_ENV, KEY)
    server = FakeJudge()
    yield server
    server.close()


def answer(text: str) -> str:
    return f"<think>hm</think><answer> Final Answer:{text} </answer>"


def test_parse_verdict():
    assert parse_verdict("Correct") is True
    assert parse_verdict("correct.") is True
    assert parse_verdict("**Incorrect**") is False
    assert parse_verdict("Incorrect, although it looks correct") is False  # the first verdict said
    assert parse_verdict("The answer is CORRECT") is True
    assert parse_verdict("incorrectly formatted but right") is None  # no verdict word
    assert parse_verdict("") is None and parse_verdict(None) is None


def test_judge_prompt_shows_question_reference_and_response_tail():
    item = EvalItem("1", "Hint: ...\nQuestion: angle?", "B", [], choices=["145°", "165°"], multiple_choice=True,
                    judge_question="Find the angle.\nChoices:\n(A) 145°\n(B) 165°")
    prompt = judge_prompt(item, "x" * 10000 + answer("165°"))
    assert "Find the angle." in prompt and "Reference answer: B (165°)" in prompt
    assert prompt.count("x") < 4100 and "Final Answer:165°" in prompt  # only the end of a long response


def test_retries_then_verdicts_key_sent_never_logged(api, caplog):
    items = [EvalItem(str(i), f"q{i}", truth, []) for i, truth in enumerate(["3", "4", "5", "6"])]
    completions = [answer("3"), answer("7"), "GARBAGE " + answer("5"), None]
    judge = Judge(JudgeSpec(endpoint=api.url, model="gpt-4o-mini"))
    with caplog.at_level(logging.DEBUG):
        verdicts = judge.verdicts(items, completions)
    assert verdicts == [True, False, None, None]  # right, wrong, no verdict, nothing to judge
    assert sorted(api.attempts.values()) == [3, 3, 3]  # 429, 500, then an answer; no request for None
    assert set(api.auth) == {f"Bearer {KEY}"}
    assert {b["model"] for b in api.bodies} == {"gpt-4o-mini"} and {b["temperature"] for b in api.bodies} == {0.0}
    described = judge.describe()
    assert described["requestsRetriedOrFailed"] == {"http_429": 3, "http_500": 3}
    assert KEY not in caplog.text and KEY not in json.dumps(described)


def test_gives_up_after_bounded_retries(monkeypatch):
    monkeypatch.setattr(openai_api, "BACKOFF_BASE_SECONDS", 0.01)
    server = FakeJudge(failures=[503] * 10)
    try:
        judge = Judge(JudgeSpec(endpoint=server.url, model="m"), max_retries=2)
        assert judge.verdicts([EvalItem("1", "q", "1", [])], [answer("1")]) == [None]
        assert sum(server.attempts.values()) == 3
        assert judge.describe()["requestsRetriedOrFailed"] == {"http_503": 3, "gave_up": 1}
    finally:
        server.close()


class ScriptedSampler:
    def __init__(self, completions):
        self.completions = completions

    def generate(self, items, seed):
        return [Sample(self.completions(item), 6) for item in items]

    def close(self):
        pass


def test_stage_reports_judged_beside_rule_scores(tmp_path, api, monkeypatch):
    data = generate(tmp_path / "data", n=2, n_eval=6, tasks=("count",))
    truths = [json.loads(line)["answer"] for line in data.eval.read_text().splitlines()]

    def completion(item):
        # Rule-right on every item; but item 0's answer hides behind GARBAGE for the judge,
        # and item 1 is written so that rules accept it while the judge sees another value.
        if item.id.endswith("000000"):
            return "GARBAGE " + answer(item.answer)
        if item.id.endswith("000001"):
            return answer(f"{item.answer}.0")
        return answer(item.answer)

    monkeypatch.setattr(eval_stage, "load_sampler", lambda *a: (ScriptedSampler(completion), "scripted"))
    config = EvalStageConfig.model_validate({
        "kind": "eval", "run": "t", "stage": "eval", "outputUri": f"file://{tmp_path}/out",
        "storage": {"uri": f"file://{tmp_path}"}, "model": {"name": "org/model"}, "metricsPort": 0,
        "terminationMessagePath": str(tmp_path / "term"), "models": {"sft": f"file://{tmp_path}/sft"},
        "benchmarks": [{"name": "count", "format": "synthetic", "data": {"source": str(data.root)}}],
        "eval": {"backend": "hf", "judge": {"endpoint": api.url, "model": "gpt-4o-mini",
                                           "apiKeySecret": {"name": "judge-key", "key": "token"}}},
    }, by_name=False)
    summary = eval_stage.run(config)
    unit = json.loads((tmp_path / "out" / "results" / "summary.json").read_text())["benchmarks"]["count"]["sft"]
    assert unit["accuracy"] == 1.0 and unit["n"] == len(truths) == 6  # rules: all right
    assert unit["judgeFailures"] == 1 and unit["judgedAccuracy"] == round(4 / 5, 4)  # 1 unjudged, 1 judged wrong
    assert summary["benchmarks"]["count"]["sft"] == {"accuracy": 1.0, "judgedAccuracy": 0.8, "n": 6}
    lines = (tmp_path / "out" / "results" / "records-count-sft.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["judged"] for r in records] == [None, False, True, True, True, True]
    full = json.loads((tmp_path / "out" / "results" / "summary.json").read_text())
    assert full["judge"]["model"] == "gpt-4o-mini" and KEY not in json.dumps(full)
    steps = read_jsonl(tmp_path / "out" / "_work" / "metrics.jsonl")
    assert steps[-1]["eval_count_sft_judged_accuracy"] == 0.8 and steps[-1]["eval_count_sft_accuracy"] == 1.0
