"""The ``openai`` backend: any OpenAI-compatible chat endpoint (a vLLM server, a hosted model).

``endpoint`` is the API base URL (``http://host:8000/v1``); requests are POSTed to
``<endpoint>/chat/completions``. The API key comes from the environment
(``VISIONR1_BRIDGE_MULTIMODAL_API_KEY`` / ``VISIONR1_BRIDGE_REASONING_API_KEY``, filled
from the spec's ``apiKeySecret``) and is never logged. At most ``concurrency`` requests
are in flight; 429, 5xx, timeouts and dropped connections are retried up to
``maxRetries`` times with exponential backoff and jitter (a ``Retry-After`` header is
honoured); other 4xx answers fail the request at once. ``timeoutSeconds`` bounds each
socket operation (connect, and every read while waiting for the answer).

Redirects: the key is sent to the endpoint's own origin only. A redirect to another
scheme, host or port is refused (the request fails as ``openai_cross_origin_redirect``,
not retried), since urllib would re-send ``Authorization`` there; a same-origin one is
followed, keeping the POST and its body for 307/308. A plain ``http://`` endpoint other
than loopback is allowed (in-cluster Services often are) with one warning: the key and
the images travel unencrypted.

Reasoning models served with a reasoning parser return the chain of thought apart from
the answer (``reasoning_content`` or ``reasoning``); it is kept as ``Completion.reasoning``.

Long answers: with ``stream`` (the default) the answer arrives as server-sent events and
``timeoutSeconds`` bounds the wait for each event, not the whole answer, so a 16K-token
chain of thought from a busy server is not cut off and asked for again (which would bias
the data set against long reasoning). Without streaming, the read timeout is sized from
the token budget: ``timeoutSeconds + maxTokens / MIN_DECODE_TOKENS_PER_SECOND``.
``finish_reason`` is passed on: a ``length`` answer is dropped by the pipeline.

Outages: after ``circuitBreakerFailures`` failed attempts in a row (connection errors,
timeouts, 5xx, bad answers, a refused key) with no answer between, the circuit opens:
every request still waiting fails at once as ``openai_circuit_open`` instead of
hammering the endpoint, and ``outage()`` tells the pipeline, which stops the stage
naming the endpoint and the error. A 429 is a live server asking us to slow down: it
neither opens nor closes the circuit. Failures of the endpoint are ``retryable``
(asked again on the next run); answers that refuse the request itself (400, 413, 422)
are not.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ...redact import redact
from . import API_KEY_ENV, Completion, Generator, GeneratorContext, Progress, Request, chat_messages, register

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 1.0  # first retry waits about this long, then doubles
BACKOFF_CAP_SECONDS = 60.0
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# The request itself is at fault: asking again on the next run cannot help.
REQUEST_REFUSED_STATUS = frozenset({400, 413, 422})
# Without streaming the whole answer must arrive within one read: assume a server decodes
# at least this many tokens per second for one request (a loaded R1 server does ~10-30).
MIN_DECODE_TOKENS_PER_SECOND = 5.0


class Retryable(Exception):
    def __init__(self, kind: str, retry_after: float | None = None):
        super().__init__(kind)
        self.kind, self.retry_after = kind, retry_after


class OpenAIGenerator(Generator):
    kind = "openai"

    def __init__(self, spec, ctx: GeneratorContext):
        self.spec, self.ctx = spec, ctx
        self.url = spec.endpoint.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(API_KEY_ENV[ctx.role]) or None
        warn_if_plain_http(spec.endpoint)
        # One opener per generator: its redirect handler knows the endpoint's origin.
        self._opener = urllib.request.build_opener(_SameOriginRedirects(self.url))
        self._rng = random.Random(ctx.seed)
        self._lock = threading.Lock()
        self.counters: collections.Counter = collections.Counter()  # retries and failures by kind
        self.breaker = CircuitBreaker(spec.circuit_breaker_failures)

    def generate(self, requests: Sequence[Request], progress: Progress = None) -> list[Completion]:
        def one(request: Request) -> Completion:
            result = self._request_with_retries(request)
            if progress:
                progress(1)
            return result

        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(one, requests))

    def _request_with_retries(self, request: Request) -> Completion:
        body = json.dumps(self._payload(request)).encode()
        attempt = 0
        while True:
            if self.breaker.is_open:
                self._count("circuit_open")
                return Completion(None, error="openai_circuit_open", retryable=True)
            try:
                completion = self._post(body)
            except _Fatal as exc:
                self._count(exc.kind)
                refused = exc.kind in {f"http_{s}" for s in REQUEST_REFUSED_STATUS}
                self.breaker.record(exc.kind, alive=refused)
                return Completion(None, error=f"openai_{exc.kind}", retryable=not refused)
            except Retryable as exc:
                self._count(exc.kind)
                self.breaker.record(exc.kind, alive=None if exc.kind == "http_429" else False)
                if attempt >= self.spec.max_retries:
                    self._count("gave_up")
                    return Completion(None, error=f"openai_{exc.kind}", retryable=True)
                time.sleep(self._backoff(attempt, exc.retry_after))
                attempt += 1
                continue
            self.breaker.record("ok", alive=True)
            return completion

    def outage(self) -> str | None:
        """Why the circuit is open (the endpoint and the last error), or None while it is closed."""
        cause = self.breaker.cause
        return f"{redact(self.spec.endpoint)}: {cause}" if cause else None

    def read_timeout(self) -> float:
        """Seconds one socket read may wait: for the next event when streaming, else for the
        whole answer (sized from the token budget)."""
        if self.spec.stream:
            return self.spec.timeout_seconds
        return self.spec.timeout_seconds + self.spec.max_tokens / MIN_DECODE_TOKENS_PER_SECOND

    def _payload(self, request: Request) -> dict[str, Any]:
        payload = {
            "model": self.spec.model,
            "messages": chat_messages(request.prompt, request.image_paths),
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
            "top_p": self.spec.top_p,
        }
        if self.spec.stream:
            payload["stream"] = True
        return payload

    def _post(self, body: bytes) -> Completion:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.read_timeout()) as resp:
                if "text/event-stream" in (resp.headers.get("Content-Type") or ""):
                    return _parse_stream(resp)
                payload = resp.read()  # not streamed (stream off, or a server that ignores it)
        except (_Fatal, Retryable):
            raise
        except urllib.error.HTTPError as exc:
            raise _classify(exc) from None
        except (TimeoutError, socket.timeout):
            raise Retryable("timeout") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            if isinstance(getattr(exc, "reason", None), (TimeoutError, socket.timeout)):
                raise Retryable("timeout") from None
            raise Retryable("connection_error") from None
        return _parse(payload)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, BACKOFF_CAP_SECONDS)
        delay = min(BACKOFF_BASE_SECONDS * 2**attempt, BACKOFF_CAP_SECONDS)
        with self._lock:
            return delay * (0.5 + self._rng.random() / 2)  # jitter: spread retry bursts

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counters[kind] += 1

    def describe(self) -> dict[str, Any]:
        # The endpoint and model, never the key.
        return {"backend": "openai", "endpoint": self.spec.endpoint, "model": self.spec.model,
                "max_tokens": self.spec.max_tokens, "temperature": self.spec.temperature,
                "top_p": self.spec.top_p, "stream": self.spec.stream,
                "requests_retried_or_failed": dict(self.counters)}


class _Fatal(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class CircuitBreaker:
    """Opens after ``threshold`` failed attempts in a row with no answer between; stays open.

    ``record(kind, alive)``: ``alive`` True for an answer from a working server (resets the
    count), False for a failure of the endpoint, None for neither (a 429). Thread-safe.
    Once open it stays open for this generator: the pipeline stops the stage and a later
    run (a new generator) tries the endpoint again.
    """

    def __init__(self, threshold: int):
        self.threshold, self.failures, self.cause = threshold, 0, None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.cause is not None

    def record(self, kind: str, alive: bool | None) -> None:
        with self._lock:
            if alive:
                self.failures = 0
            elif alive is False:
                self.failures += 1
                if self.failures >= self.threshold and self.cause is None:
                    self.cause = f"{self.failures} failed attempts in a row, the last {kind}"
                    log.error("openai endpoint: circuit open after %s", self.cause)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects within the endpoint's origin only; refuse the others.

    urllib copies every header but the content ones onto the redirected request, so a
    301 to another host would hand it ``Authorization: Bearer <key>``.
    """

    def __init__(self, url: str):
        self.origin = origin(url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if origin(target) != self.origin:
            fp.close()  # urllib closes it only after a redirect it follows
            scheme, host, port = origin(target)
            log.warning("openai endpoint redirected to another origin (%s://%s:%s); refused, the "
                        "API key is sent to %s://%s:%s only", scheme, host, port, *self.origin)
            raise _Fatal("cross_origin_redirect")
        if code in (307, 308) and req.get_method() == "POST":
            # urllib refuses these for POST; within the origin, re-POST the same body.
            return urllib.request.Request(target, data=req.data, headers=dict(req.header_items()),
                                          method="POST")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_warned_plain_http: set[str] = set()


def warn_if_plain_http(endpoint: str) -> None:
    """Warn once per endpoint that is plain ``http://`` and not loopback."""
    scheme, host, _ = origin(endpoint)
    if scheme != "http" or endpoint in _warned_plain_http or _is_loopback(host):
        return
    _warned_plain_http.add(endpoint)
    log.warning("endpoint %s is plain http: the API key and the prompts travel unencrypted "
                "(use https outside a trusted network)", redact(endpoint))


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _classify(exc: urllib.error.HTTPError) -> Exception:
    status = exc.code
    detail = ""
    try:
        detail = exc.read(300).decode(errors="replace")
    except OSError:
        pass
    if status in RETRY_STATUS or status >= 500:
        return Retryable(f"http_{status}", _retry_after(exc.headers.get("Retry-After")))
    # The body is the endpoint's words: it may echo the key or the request, so redact it.
    log.warning("openai endpoint answered %d: %s", status, redact(detail[:300]))
    return _Fatal(f"http_{status}")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


def _parse(payload: bytes) -> Completion:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Retryable("bad_response") from None
    text = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or None
    return _completion(text, reasoning, choice.get("finish_reason"))


def _completion(text: str, reasoning: str | None, finish_reason: str | None) -> Completion:
    if not text and not reasoning:
        return Completion(None, error="openai_empty", finish_reason=finish_reason)
    return Completion(text, reasoning=reasoning, finish_reason=finish_reason)


def _parse_stream(resp) -> Completion:
    """An answer sent as server-sent events (``data: {chunk}`` lines, ``data: [DONE]``).

    The deltas of ``content`` and of the reasoning channel are joined; the last
    ``finish_reason`` seen is the answer's. A stream that ends before a finish reason or
    ``[DONE]`` was cut (a dropped connection, a restarted server): retried.
    """
    text, reasoning, finish, done = [], [], None, False
    for raw in resp:  # each read waits at most the socket timeout
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise Retryable("bad_response") from None
        if not isinstance(chunk, dict) or "error" in chunk:
            raise Retryable("stream_error")
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
            finish = choice.get("finish_reason") or finish
    if not done and finish is None:
        raise Retryable("incomplete_stream")
    return _completion("".join(text), "".join(reasoning) or None, finish)


@register("openai")
def _make(spec, ctx) -> OpenAIGenerator:
    return OpenAIGenerator(spec, ctx)
