"""Issue 18, finding 6: the API key is sent to the endpoint's own origin only.

urllib re-sends every header but the content ones on a 301/302/303, so an endpoint (or
whoever answers for it) that redirects to another host was handed ``Authorization``. Two
local servers: the endpoint redirects, the second one records what reaches it.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from visionr1_trainer.bridge.backends import GeneratorContext, Request, make_generator, openai_api
from visionr1_trainer.config import GeneratorSpec, JudgeSpec

KEY = "sk-redirect-test-0123456789"
ANSWER = {"choices": [{"message": {"content": "fine"}}]}


class Recorder:
    """A local HTTP server that records every request's method, path and Authorization.

    ``redirect`` (status, location) makes it answer every POST to ``/v1/chat/completions``
    with that redirect; anything else gets a chat answer.
    """

    def __init__(self, redirect: tuple[int, str] | None = None):
        self.seen: list[tuple[str, str, str | None]] = []
        self.redirect = redirect
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                rec.seen.append((self.command, self.path, self.headers.get("Authorization")))
                if rec.redirect and self.path == "/v1/chat/completions":
                    status, location = rec.redirect
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(ANSWER).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    made: list[Recorder] = []

    def make(redirect=None) -> Recorder:
        made.append(Recorder(redirect))
        return made[-1]

    yield make
    for server in made:
        server.close()


def generate(endpoint: str, monkeypatch) -> list:
    monkeypatch.setenv("VISIONR1_BRIDGE_REASONING_API_KEY", KEY)
    spec = GeneratorSpec(backend="openai", model="m", endpoint=endpoint, max_retries=2)
    gen = make_generator(spec, GeneratorContext("reasoning"))
    return gen.generate([Request("k", "reasoning", "hello")])


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_cross_origin_redirect_never_carries_the_key(servers, monkeypatch, status):
    other = servers()
    endpoint = servers(redirect=(status, f"{other.base}/v1/chat/completions"))
    [completion] = generate(f"{endpoint.base}/v1", monkeypatch)
    assert other.seen == []  # refused before any request reaches the other origin
    assert completion.text is None and completion.error == "openai_cross_origin_redirect"
    assert len(endpoint.seen) == 1  # not retried: the answer will not change


def test_a_redirect_to_another_port_of_the_same_host_is_another_origin(servers, monkeypatch):
    other = servers()
    endpoint = servers(redirect=(302, f"http://localhost:{other.server.server_port}/x"))
    [completion] = generate(f"{endpoint.base}/v1", monkeypatch)
    assert other.seen == [] and completion.error == "openai_cross_origin_redirect"


def test_a_same_origin_307_is_followed_with_the_post_and_the_key(servers, monkeypatch):
    endpoint = servers()
    endpoint.redirect = (307, f"{endpoint.base}/v2/chat/completions")
    [completion] = generate(f"{endpoint.base}/v1", monkeypatch)
    assert completion.text == "fine"
    assert endpoint.seen == [("POST", "/v1/chat/completions", f"Bearer {KEY}"),
                             ("POST", "/v2/chat/completions", f"Bearer {KEY}")]


def test_the_judge_shares_the_client_and_refuses_too(servers, monkeypatch):
    from visionr1_trainer.eval.benchmarks import EvalItem
    from visionr1_trainer.eval.judge import JUDGE_API_KEY_ENV, Judge

    other = servers()
    endpoint = servers(redirect=(302, f"{other.base}/v1/chat/completions"))
    monkeypatch.setenv(JUDGE_API_KEY_ENV, KEY)
    judge = Judge(JudgeSpec(endpoint=f"{endpoint.base}/v1", model="judge"), max_retries=0)
    item = EvalItem(id="i", question="q", answer="1", image_paths=[])
    assert judge.verdicts([item], ["<answer>1</answer>"]) == [None]
    assert other.seen == []


def test_plain_http_endpoints_warn_once_except_loopback(caplog, monkeypatch):
    monkeypatch.setattr(openai_api, "_warned_plain_http", set())
    with caplog.at_level(logging.WARNING, logger=openai_api.log.name):
        for endpoint in ("http://vllm.models.svc:8000/v1", "http://vllm.models.svc:8000/v1",
                         "http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
                         "https://api.example.com/v1"):
            openai_api.warn_if_plain_http(endpoint)
    warned = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    assert len(warned) == 1 and "vllm.models.svc" in warned[0]


def test_the_generator_warns_on_plain_http_when_built(caplog, monkeypatch):
    monkeypatch.setattr(openai_api, "_warned_plain_http", set())
    spec = GeneratorSpec(backend="openai", model="m", endpoint="http://teacher.example:8000/v1")
    with caplog.at_level(logging.WARNING, logger=openai_api.log.name):
        make_generator(spec, GeneratorContext("reasoning"))
    assert any("plain http" in r.getMessage() for r in caplog.records)
