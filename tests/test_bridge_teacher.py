"""The bridge against a teacher that is slow, cut short or down (issue 19, findings 5-8).

Every endpoint here is a local fake (``fake_openai``); nothing leaves the machine.
"""

from __future__ import annotations

import collections
import json
import re
import time

import pytest
from fake_openai import FakeOpenAIServer
from PIL import Image

from visionr1_trainer.bridge import pipeline, prompts
from visionr1_trainer.bridge.backends import Completion, GeneratorContext, Request, make_generator, openai_api
from visionr1_trainer.bridge.filters import parse_reasoning
from visionr1_trainer.config import BridgeFilters, BridgeSettings, BridgeStageConfig, GeneratorSpec
from visionr1_trainer.data import bridge_row, write_rows
from visionr1_trainer.data.formats import BridgeExample


class Teacher(FakeOpenAIServer):
    """Steps 1-3 of a fake MLLM / reasoning model that pass the answer along.

    ``fail(prompt, attempt)`` returns an HTTP status to fail that attempt with, or None;
    ``finish`` is the finish reason of every answer; streamed requests are answered with
    ``gap_s`` between events, non-streamed ones after ``slow_s``.
    """

    def __init__(self, fail=lambda prompt, attempt: None, finish="stop", gap_s=0.0, slow_s=0.0):
        self.fail, self.finish, self.gap_s, self.slow_s = fail, finish, gap_s, slow_s
        self.attempts: collections.Counter = collections.Counter()
        self.streamed = 0
        super().__init__()

    def handle(self, handler, body):
        content = body["messages"][0]["content"]
        prompt = content if isinstance(content, str) else content[-1]["text"]
        with self.lock:
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
        status = self.fail(prompt, attempt)
        if status:
            self.reply(handler, status, {"error": {"message": "scripted"}})
            return
        message = answer(prompt)
        if body.get("stream"):
            with self.lock:
                self.streamed += 1
            self.reply_stream(handler, self.stream_chunks(message["content"], message.get("reasoning_content", ""),
                                                          self.finish), gap_s=self.gap_s)
            return
        time.sleep(self.slow_s)
        self.reply(handler, 200, {"choices": [{"message": message, "finish_reason": self.finish}]})


def answer(prompt: str) -> dict:
    if "Correct answer:" in prompt:
        given = prompt.rsplit("Correct answer:", 1)[1].strip()
        return {"content": f"I see the figure; so the answer is {given}."}
    if "Write a detailed description" in prompt:
        seen = re.search(r"the answer is (\S+?)\.", prompt).group(1)
        return {"content": f"A figure showing the number {seen}."}
    number = re.search(r"the number (\S+?)\.", prompt).group(1)
    return {"content": f"The number is \\boxed{{{number}}}.",
            "reasoning_content": f"The description says {number}. Wait, let me check: yes, {number}."}


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setattr(openai_api, "BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.setenv("VISIONR1_BRIDGE_MULTIMODAL_API_KEY", "k")
    monkeypatch.setenv("VISIONR1_BRIDGE_REASONING_API_KEY", "k")


def spec(url: str, **kw) -> GeneratorSpec:
    return GeneratorSpec.model_validate({"backend": "openai", "endpoint": url, "model": "fake",
                                         "timeoutSeconds": 0.3, "concurrency": 2, **kw})


def source(tmp_path, n=6):
    rows = []
    for i in range(1, n + 1):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(bridge_row(f"q{i}", f"{i}.png", f"Which number is shown in figure {i}?", str(i)))
    return write_rows(rows, tmp_path / "source.jsonl")


def stage(tmp_path, url, **bridge) -> BridgeStageConfig:
    generator = {"backend": "openai", "endpoint": url, "model": "fake", "timeoutSeconds": 5, "maxRetries": 1}
    return BridgeStageConfig.model_validate({
        "run": "r", "stage": "bridge", "outputUri": f"file://{tmp_path}/out",
        "storage": {"uri": f"file://{tmp_path}"}, "model": {"name": "file://unused"}, "metricsPort": 0,
        "source": {"source": str(source(tmp_path))},
        "bridge": {"multimodalModel": generator, "reasoningModel": generator, **bridge},
    })


def stats(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())


# --- 5: an outage does not empty the data set for good -------------------------------------


def test_failed_rows_stay_pending_and_the_next_run_asks_only_for_them(keys, tmp_path):
    """Two of six reasoning requests fail (the endpoint 503s for them): the stage fails
    naming the endpoint; a second run against a working teacher asks only for those two and
    keeps all six (before: they were committed as generation_failed and never asked again)."""
    down = lambda prompt, attempt: 503 if re.search(r"the number [12]\.", prompt) else None  # noqa: E731
    api = Teacher(fail=down)
    try:
        with pytest.raises(pipeline.TeacherFailed, match=re.escape(api.url)) as failed:
            pipeline.run(stage(tmp_path, api.url))
        assert "2 of 6 reasoning requests" in str(failed.value) and "http_503" in str(failed.value)
        assert not (tmp_path / "out" / "dataset").exists()
        first = dict(api.attempts)
        api.fail = lambda prompt, attempt: None  # the teacher is back
        summary = pipeline.run(stage(tmp_path, api.url))
    finally:
        api.close()
    asked_again = {p: n - first.get(p, 0) for p, n in api.attempts.items() if n - first.get(p, 0)}
    assert sorted(re.search(r"the number (\d)", p).group(1) for p in asked_again) == ["1", "2"]
    assert summary["kept"] == 6 and stats(tmp_path)["dropped"] == {}


def test_failures_under_the_bound_are_dropped_and_counted(keys, tmp_path):
    down = lambda prompt, attempt: 503 if "the number 3." in prompt else None  # noqa: E731
    api = Teacher(fail=down)
    try:
        summary = pipeline.run(stage(tmp_path, api.url, maxFailureRate=0.2))
    finally:
        api.close()
    assert summary["kept"] == 5 and stats(tmp_path)["dropped"] == {"generation_failed": 1}


def test_a_dead_endpoint_opens_the_circuit_and_stops_the_stage(keys, tmp_path):
    """After ``circuitBreakerFailures`` failed attempts in a row no request is sent any more
    (before: 6 rows x 2 attempts were all tried), and the stage fails naming the endpoint."""
    api = Teacher(fail=lambda prompt, attempt: 503)
    config = stage(tmp_path, api.url)
    config.bridge.multimodal_model.circuit_breaker_failures = 3
    config.bridge.multimodal_model.concurrency = 1
    try:
        with pytest.raises(pipeline.NothingKept, match=re.escape(api.url)):
            pipeline.run(config)
    finally:
        api.close()
    assert sum(api.attempts.values()) == 3


def test_circuit_breaker_fails_waiting_requests_at_once(keys):
    api = Teacher(fail=lambda prompt, attempt: 503)
    try:
        gen = make_generator(spec(api.url, circuitBreakerFailures=4, concurrency=1, maxRetries=3),
                             GeneratorContext("reasoning"))
        out = gen.generate([Request(f"k{i}", "reasoning", f"Image: the number {i}. Q?") for i in range(10)])
    finally:
        api.close()
    assert sum(api.attempts.values()) == 4
    assert [o.error for o in out[1:]] == ["openai_circuit_open"] * 9 and all(o.retryable for o in out)
    assert api.url in gen.outage() and "http_503" in gen.outage()


def test_a_429_or_a_refused_request_does_not_open_the_circuit(keys):
    api = Teacher(fail=lambda prompt, attempt: 429 if attempt < 3 else (400 if "bad" in prompt else None))
    try:
        gen = make_generator(spec(api.url, circuitBreakerFailures=2, concurrency=1, maxRetries=3),
                             GeneratorContext("reasoning"))
        out = gen.generate([Request("a", "reasoning", "bad request"),
                            Request("b", "reasoning", "Image: the number 4. Q?")])
    finally:
        api.close()
    assert gen.outage() is None
    assert out[0].error == "openai_http_400" and not out[0].retryable
    assert out[1].text == "The number is \\boxed{4}."


# --- 6: truncated generations, multi-line boxed answers -----------------------------------


def test_a_generation_cut_at_the_budget_is_dropped_as_truncated(keys, tmp_path):
    api = Teacher(finish="length")
    try:
        with pytest.raises(pipeline.NothingKept, match="truncated"):
            pipeline.run(stage(tmp_path, api.url))
    finally:
        api.close()


def test_truncated_reasoning_verdict_and_parsed_finish_reason():
    item = BridgeExample("q", "Q?", "4", ["x.png"], {})
    cut = Completion("so far \\boxed{4} and then", finish_reason="length")
    row = pipeline.verdict(item, cut, {"description": "d"}, BridgeFilters())
    assert row["status"] == "truncated" and not row["retryable"]
    whole = pipeline.verdict(item, Completion("\\boxed{4}", reasoning="Wait, 4.", finish_reason="stop"),
                             {"description": "d"}, BridgeFilters())
    assert whole["status"] == "kept"
    payload = json.dumps({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}).encode()
    assert openai_api._parse(payload).truncated


def test_a_multi_line_boxed_answer_is_read_whole():
    text = "<think>r</think>\nThe matrix is \\boxed{\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}}.\nDone."
    assert parse_reasoning(text).answer == "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    assert parse_reasoning("r</think>Final Answer: \\boxed{x = 1,\nx = 2}").answer == "x = 1, x = 2"
    assert parse_reasoning("r</think>Final Answer: 5\nThat is all.").answer == "5"


# --- 7: long answers are streamed, or waited for by the budget --------------------------------


def test_a_long_streamed_answer_is_not_cut_by_the_timeout(keys):
    """The answer takes 8 x 0.1 s, longer than the 0.3 s timeout, but no event is 0.3 s
    late: streamed, it arrives whole on the first attempt (before: timed out, asked again)."""
    api = Teacher(gap_s=0.1, slow_s=1.0)
    try:
        gen = make_generator(spec(api.url, maxRetries=0), GeneratorContext("reasoning"))
        out = gen.generate([Request("a", "reasoning", "Image: the number 7. Q?")])
    finally:
        api.close()
    assert out[0].text == "The number is \\boxed{7}." and out[0].finish_reason == "stop"
    assert out[0].reasoning == "The description says 7. Wait, let me check: yes, 7."
    assert api.streamed == 1 and sum(api.attempts.values()) == 1


def test_without_streaming_the_timeout_is_sized_from_the_token_budget(keys):
    gen = make_generator(spec("http://127.0.0.1:1/v1", stream=False, timeoutSeconds=60, maxTokens=16384),
                         GeneratorContext("reasoning"))
    assert gen.read_timeout() == 60 + 16384 / openai_api.MIN_DECODE_TOKENS_PER_SECOND
    assert make_generator(spec("http://127.0.0.1:1/v1", timeoutSeconds=60),
                          GeneratorContext("reasoning")).read_timeout() == 60


def test_a_stream_cut_short_is_retried(keys):
    class Cut(Teacher):
        def handle(self, handler, body):
            with self.lock:
                self.attempts["x"] += 1
                first = self.attempts["x"] == 1
            self.reply_stream(handler, self.stream_chunks("\\boxed{1}")[:-1] if first else self.stream_chunks("\\boxed{1}"),
                              done=not first)

    api = Cut()
    try:
        out = make_generator(spec(api.url), GeneratorContext("reasoning")).generate([Request("a", "reasoning", "x")])
    finally:
        api.close()
    assert out[0].text == "\\boxed{1}" and api.attempts["x"] == 2


# --- 8: small shards by default; text-only rows ----------------------------------------------


def test_default_shards_are_small():
    settings = BridgeSettings()
    assert settings.shards is None and settings.shard_size == 64
    plan = pipeline.shard_plan([str(i) for i in range(200)], settings.shards, settings.shard_size)
    assert [len(s) for s in plan] == [50, 50, 50, 50]
    assert len(pipeline.shard_plan([str(i) for i in range(200_000)], None, 64)) == 3125
    assert [len(s) for s in pipeline.shard_plan(["a", "b", "c"], 2)] == [2, 1]


def test_text_only_rows_skip_the_multimodal_steps():
    class Echo:
        def __init__(self):
            self.requests = []

        def generate(self, requests, progress=None):
            self.requests += list(requests)
            return [Completion("\\boxed{9}", reasoning="Wait, 9.") for _ in requests]

    items = [BridgeExample("t", "What is 4 + 5?", "9", [], {})]
    mllm, reasoner = Echo(), Echo()
    described = pipeline.describe_shard(mllm, items, prompts.DEFAULTS, None)
    assert mllm.requests == [] and described[0]["text_only"] and not described[0]["retryable"]
    rows = pipeline.reason_shard(reasoner, items, {"t": described[0]}, prompts.DEFAULTS, BridgeFilters(), None)
    assert reasoner.requests[0].prompt.startswith("What is 4 + 5?") and reasoner.requests[0].image_paths == ()
    assert rows[0]["status"] == "kept" and rows[0]["response"].endswith("Final Answer:9 </answer>")


def test_local_backends_report_a_cut_generation():
    import torch

    from visionr1_trainer.bridge.backends.hf import finish_reasons
    from visionr1_trainer.bridge.backends.vllm_engine import split_output

    assert split_output("Wait, so", "length").truncated and not split_output("done", "stop").truncated
    rows = torch.tensor([[5, 6, 7], [5, 2, 0], [5, 0, 0]])  # 2 = EOS, 0 = padding
    assert finish_reasons(rows, 3, {2}) == ["length", "stop", "length"]
    assert finish_reasons(rows, 4, {2}) == ["stop", "stop", "stop"]
