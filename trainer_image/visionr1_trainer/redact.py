"""One redaction for every message that can leave a stage.

Error messages travel far: a stage's exit summary becomes its Pod's termination message,
the VisionR1Run's status and conditions, a Warning Event and the HTML report, and its log
lines are kept by the cluster's log collector. ``redact`` is applied to each of them
(storage and data-source errors when they are raised, the exit summary, every log line),
so a secret that reaches a message by any path (a URL with ``user:pass@``, an endpoint
echoing the request, a botocore error) is masked before it is written.

It masks, in this order:

* the values of the environment variables that carry secrets into a stage (the operator
  maps Secrets there with ``secretKeyRef``), wherever they appear;
* the user-info of any URL (``https://user:pass@host`` -> ``https://***@host``);
* ``Bearer <token>``, ``key=value`` pairs whose key names a secret (``api_key``,
  ``password``, ``X-Amz-Signature``...), and strings shaped like well-known key formats
  (``sk-...``, ``hf_...``, ``AKIA...``, ``ghp_...``).

Pure standard library: the operator may import it too.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

MASK = "***"
# Where stages find their secrets (operator/visionr1_operator/cluster/pods.py maps them).
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "VISIONR1_BRIDGE_MULTIMODAL_API_KEY",
    "VISIONR1_BRIDGE_REASONING_API_KEY", "VISIONR1_JUDGE_API_KEY", "OPENAI_API_KEY",
)
# Shorter values are not masked by value: "test" (moto's keys) would mask words everywhere.
MIN_SECRET_LENGTH = 8

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#]*@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_KEY_VALUE = re.compile(
    r"(?i)\b((?:aws_secret_access_key|aws_session_token|secret_access_key|api[_-]?key|access[_-]?token"
    r"|auth[_-]?token|password|passwd|secret|x-amz-signature|x-amz-security-token|x-amz-credential)"
    r"[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;]+")
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,}|(?:AKIA|ASIA)[A-Z0-9]{12,}|gh[pousr]_[A-Za-z0-9]{16,})")


def secret_values(extra: Iterable[str] = ()) -> list[str]:
    """The secret values this process holds (longest first, so none is half-masked)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV} | set(extra)
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: object, extra: Iterable[str] = ()) -> str:
    """``text`` with secrets masked (see the module docstring); ``extra``: more values."""
    out = str(text)
    for value in secret_values(extra):
        out = out.replace(value, MASK)
    out = _USERINFO.sub(rf"\1{MASK}@", out)
    out = _BEARER.sub(rf"\1{MASK}", out)
    out = _KEY_VALUE.sub(rf"\1{MASK}", out)
    return _KEY_SHAPES.sub(MASK, out)


def redact_value(value):
    """``redact`` through a JSON-like value (a stage summary): strings masked, keys kept."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value
