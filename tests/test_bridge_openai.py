"""The openai backend against a local OpenAI-compatible server: retries, timeouts, keys."""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAIServer
from PIL import Image

from visionr1_trainer.bridge import pipeline
from visionr1_trainer.bridge.backends import GeneratorContext, Request, make_generator, openai_api
from visionr1_trainer.config import BridgeStageConfig, GeneratorSpec
from visionr1_trainer.data import bridge_row, write_rows

KEY = "test-key-0123456789"


class FakeAPI(FakeOpenAIServer):
    """An OpenAI-compatible chat endpoint whose failures are scripted per prompt.

    ``script`` is the list of what the n-th attempt of a given prompt gets: an HTTP status
    to fail with, ``"sleep"`` (answer only after the client's timeout), or ``"ok"``.
    """

    def __init__(self, script=("ok",), sleep_s: float = 0.6):
        self.script, self.sleep_s = list(script), sleep_s
        self.attempts: collections.Counter = collections.Counter()
        self.auth: list[str | None] = []
        self.image_parts = 0
        super().__init__()

    def handle(self, handler, body):
        content = body["messages"][0]["content"]
        prompt = content if isinstance(content, str) else content[-1]["text"]
        with self.lock:
            self.auth.append(handler.headers.get("Authorization"))
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
            if not isinstance(content, str):
                self.image_parts += sum(1 for p in content if p["type"] == "image_url"
                                        and p["image_url"]["url"].startswith("data:image/png;base64,"))
        action = self.script[min(attempt, len(self.script) - 1)]
        if action == "sleep":
            time.sleep(self.sleep_s)
            action = "ok"
        if action != "ok":
            self.reply(handler, action, {"error": {"message": "scripted failure"}},
                       {"Retry-After": "0"} if action == 429 else {})
            return
        self.reply(handler, 200, {"choices": [{"message": self.answer(prompt)}]})

    def answer(self, prompt: str) -> dict:
        """A fake MLLM (steps 1-2) and reasoning model (step 3) that pass the answer along."""
        if "Correct answer:" in prompt:  # step 1: pseudo-CoT
            answer = prompt.rsplit("Correct answer:", 1)[1].strip()
            return {"content": f"I see the figure; so the answer is {answer}."}
        if "Write a detailed description" in prompt:  # step 2
            answer = re.search(r"the answer is (\S+?)\.", prompt).group(1)
            return {"content": f"A figure showing the number {answer}."}
        answer = re.search(r"the number (\S+?)\.", prompt).group(1)  # step 3
        given = "5" if answer == "6" else answer  # one wrong answer: dropped by the filter
        return {"content": f"The number is \\boxed{{{given}}}.",
                "reasoning_content": f"The description says {answer}. Wait, let me check: yes, {given}."}


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(openai_api, "BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.setenv("VISIONR1_BRIDGE_MULTIMODAL_API_KEY", KEY)
    monkeypatch.setenv("VISIONR1_BRIDGE_REASONING_API_KEY", KEY)


def spec(url: str, **kw) -> GeneratorSpec:
    return GeneratorSpec.model_validate({"backend": "openai", "endpoint": url, "model": "fake",
                                         "timeoutSeconds": 0.3, "concurrency": 4, **kw})


def test_retries_on_429_and_500_and_timeouts_then_succeeds(fast_backoff, caplog):
    api = FakeAPI(script=(429, 500, "sleep", "ok"))
    try:
        gen = make_generator(spec(api.url), GeneratorContext("reasoning"))
        caplog.set_level(logging.DEBUG)
        requests = [Request(f"k{i}", "reasoning", f"Image: the number {i}. Question?") for i in range(6)]
        out = gen.generate(requests)
    finally:
        api.close()
    assert [o.reasoning.endswith(f"yes, {i}.") for i, o in enumerate(out)] == [True] * 6
    assert all(o.text == f"The number is \\boxed{{{i}}}." for i, o in enumerate(out))
    assert set(api.attempts.values()) == {4}
    assert gen.counters == {"http_429": 6, "http_500": 6, "timeout": 6}
    assert set(api.auth) == {f"Bearer {KEY}"}
    assert KEY not in caplog.text and KEY not in json.dumps(gen.describe())


def test_gives_up_after_max_retries_and_never_retries_a_400(fast_backoff):
    api = FakeAPI(script=(503,))
    try:
        out = make_generator(spec(api.url, maxRetries=2), GeneratorContext("multimodal")).generate(
            [Request("a", "pseudo_cot", "x")])
        assert out[0].text is None and out[0].error == "openai_http_503"
        assert api.attempts["x"] == 3
        api.script = [400]
        out = make_generator(spec(api.url), GeneratorContext("multimodal")).generate(
            [Request("b", "pseudo_cot", "y")])
        assert out[0].error == "openai_http_400" and api.attempts["y"] == 1
    finally:
        api.close()


def test_bridge_end_to_end_through_an_openai_endpoint(fast_backoff, tmp_path):
    rows = []
    for i in range(1, 7):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(bridge_row(f"q{i}", f"{i}.png", f"Which number is shown in figure {i}?", str(i)))
    source = write_rows(rows, tmp_path / "source.jsonl")
    api = FakeAPI(script=(500, "ok"))  # every request fails once first
    generator = {"backend": "openai", "endpoint": api.url, "model": "fake", "timeoutSeconds": 5}
    config = BridgeStageConfig.model_validate({
        "run": "r", "stage": "bridge", "outputUri": f"file://{tmp_path}/out",
        "storage": {"uri": f"file://{tmp_path}"}, "model": {"name": "file://unused"}, "metricsPort": 0,
        "source": {"source": str(source)},
        "bridge": {"multimodalModel": generator, "reasoningModel": generator, "shards": 2},
    })
    try:
        summary = pipeline.run(config)
    finally:
        api.close()
    stats = json.loads((tmp_path / "out" / "dataset" / "stats.json").read_text())
    assert stats["kept"] == 5 and stats["dropped"] == {"answer_mismatch": 1}
    assert stats["teacher"] == "models" and stats["generators"]["reasoning"]["endpoint"] == api.url
    assert stats["self_reflection"]["wait_total"] == 5
    # steps 1 and 2 sent the image (12 requests, each tried twice); step 3 did not
    assert api.image_parts == 24
    assert set(api.attempts.values()) == {2} and len(api.attempts) == 18
    data = [json.loads(line) for line in (tmp_path / "out" / "dataset" / "data.jsonl").read_text().splitlines()]
    assert data[0]["conversations"][1]["value"] == (
        "<think>The description says 1. Wait, let me check: yes, 1.</think><answer> Final Answer:1 </answer>")
    steps = [json.loads(line) for line in (tmp_path / "out" / "_work" / "metrics.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 2 shards of phase 1, then 2 of phase 2
    assert (steps[-1]["kept"], steps[-1]["dropped_answer_mismatch"], steps[-1]["samples_done"]) == (5, 1, 6)
    assert steps[-1]["samples_per_second"] > 0
    assert summary["kept"] == 5 and Path(tmp_path / "out" / "dataset" / data[0]["images"][0]).is_file()
