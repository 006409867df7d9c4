"""An optional LLM judge behind any OpenAI-compatible endpoint (the paper used GPT-4o-mini).

The judge is shown the question, the reference answer and the end of the model's
response, and answers ``Correct`` or ``Incorrect``. Its verdicts are reported beside the
rule-based scores (``judgedAccuracy``), never instead of them.

Transport is the bridge stage's ``openai`` client (``bridge.backends.openai_api``):
``POST {endpoint}/chat/completions``, at most ``JUDGE_CONCURRENCY`` requests in flight,
retries with exponential backoff and jitter on 429, 5xx, timeouts and dropped
connections (``Retry-After`` honoured), other 4xx fail at once. The key comes from
``VISIONR1_JUDGE_API_KEY`` (the operator maps ``judge.apiKeySecret`` there) and is never
logged. A request that still fails, or an answer that is neither verdict, leaves that
sample unjudged (``judged: null``), counted in ``judgeFailures``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

from ..bridge.backends import GeneratorContext, Request
from ..bridge.backends.openai_api import OpenAIGenerator
from ..config import GeneratorSpec, JudgeSpec
from .benchmarks import EvalItem

__all__ = ["JUDGE_API_KEY_ENV", "Judge", "judge_prompt", "parse_verdict"]

log = logging.getLogger(__name__)

JUDGE_API_KEY_ENV = "VISIONR1_JUDGE_API_KEY"
JUDGE_CONCURRENCY = 8
JUDGE_TIMEOUT_S = 60.0
JUDGE_MAX_RETRIES = 5
JUDGE_MAX_TOKENS = 16  # one word is asked for; a little room for "**Correct**."
# The end of a response is where its final answer is; a cap keeps requests cheap.
RESPONSE_TAIL_CHARS = 4000

JUDGE_TEMPLATE = """You are grading the answer a model gave to a math problem.

Problem:
{question}

Reference answer: {reference}

The end of the model's response:
{response}

Is the model's final answer equivalent to the reference answer (same value, same option; \
ignore formatting and units)? Reply with exactly one word: Correct or Incorrect."""

# The first verdict word. "incorrect" first: "correct" is inside it (\b keeps them apart).
_VERDICT = re.compile(r"\b(incorrect|correct)\b", re.IGNORECASE)


def judge_prompt(item: EvalItem, completion: str) -> str:
    response = completion[-RESPONSE_TAIL_CHARS:]
    if len(completion) > RESPONSE_TAIL_CHARS:
        response = "..." + response
    return JUDGE_TEMPLATE.format(question=item.judge_question or item.question, reference=item.reference,
                                 response=response)


def parse_verdict(text: str | None) -> bool | None:
    """True for ``Correct``, False for ``Incorrect`` (the first one said), None for anything else."""
    if not text:
        return None
    match = _VERDICT.search(text)
    return None if match is None else match.group(1).lower() == "correct"


class _JudgeClient(OpenAIGenerator):
    """The bridge's OpenAI-compatible client, with the judge's own key."""

    kind = "judge"

    def __init__(self, spec: GeneratorSpec, seed: int = 0):
        super().__init__(spec, GeneratorContext(role="reasoning", seed=seed))
        self._api_key = os.environ.get(JUDGE_API_KEY_ENV) or None


class Judge:
    """Verdicts of an OpenAI-compatible judge on (item, completion) pairs, in order."""

    def __init__(self, spec: JudgeSpec, concurrency: int = JUDGE_CONCURRENCY,
                 timeout_s: float = JUDGE_TIMEOUT_S, max_retries: int = JUDGE_MAX_RETRIES):
        self.spec = spec
        if spec.api_key_secret is not None and not os.environ.get(JUDGE_API_KEY_ENV):
            log.warning("judge.apiKeySecret is set but %s is empty: requests go without a key", JUDGE_API_KEY_ENV)
        # model_construct: the judge's model name is whatever the endpoint serves (it need
        # not look like a hub id, which GeneratorSpec.model checks for).
        self.client = _JudgeClient(GeneratorSpec.model_construct(
            backend="openai", model=spec.model, endpoint=spec.endpoint, api_key_secret=None,
            tensor_parallel_size=1, max_tokens=JUDGE_MAX_TOKENS, temperature=0.0, top_p=1.0,
            concurrency=concurrency, timeout_seconds=timeout_s, max_retries=max_retries,
        ))

    def verdicts(self, items: Sequence[EvalItem], completions: Sequence[str | None]) -> list[bool | None]:
        """One verdict per pair; None where there is no completion or no usable verdict."""
        asked = [i for i, text in enumerate(completions) if text]
        requests = [Request(key=items[i].id, step="judge", prompt=judge_prompt(items[i], completions[i]))
                    for i in asked]
        out: list[bool | None] = [None] * len(items)
        for i, answer in zip(asked, self.client.generate(requests)):
            out[i] = parse_verdict(answer.text)
        return out

    def describe(self) -> dict[str, Any]:
        """Endpoint, model and retry counts; never the key."""
        return {"endpoint": self.spec.endpoint, "model": self.spec.model,
                "requestsRetriedOrFailed": dict(self.client.counters)}
