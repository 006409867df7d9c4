"""Live progress of a running stage, read from the trainer's Prometheus endpoint.

The trainer's rank-0 pod serves ``visionr1_step``, ``visionr1_total_steps``,
``visionr1_reward_mean`` and ``visionr1_completion_length_mean`` (labels run, stage) on
its ``metrics`` port. The operator reads them over the pod network, the way Prometheus
would: the trainer needs no API access and no extra privileges, and the operator only
needs to list pods to find the pod's IP and port.
"""

from __future__ import annotations

import math
from datetime import datetime

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..api import Progress
from .status import timestamp

_SERIES = {
    "visionr1_step": "step",
    "visionr1_total_steps": "total_steps",
    "visionr1_reward_mean": "reward",
    "visionr1_completion_length_mean": "completion_length",
}


def parse_progress(text: str, run: str, stage: str, now: datetime) -> Progress | None:
    """The stage's progress from an exposition-format page (None when it has none yet)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = _SERIES.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.labels.get("stage") == stage and sample.labels.get("run", run) == run:
                if not math.isnan(sample.value):
                    values[field] = sample.value
    if not values:
        return None
    step, total = values.get("step"), values.get("total_steps")
    return Progress(
        stage=stage,
        step=int(step) if step is not None and step >= 0 else None,
        total_steps=int(total) if total is not None and total >= 0 else None,
        reward=_rounded(values.get("reward")),
        completion_length=_rounded(values.get("completion_length")),
        updated_at=timestamp(now),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else round(value, 4)


def same_progress(a: Progress | None, b: Progress | None) -> bool:
    """Equal but for the time they were read: no status write for an unchanged reading."""
    if a is None or b is None:
        return a is b
    return a.model_copy(update={"updated_at": None}) == b.model_copy(update={"updated_at": None})


# A trainer's page holds a few dozen series; anything past this is not a trainer's page.
MAX_PAGE_BYTES = 1 << 20
_CHUNK = 64 << 10


def keep_series(lines: list[bytes]) -> list[bytes]:
    """The lines of the four series progress needs (samples and their HELP/TYPE lines):
    whatever else a page holds is never parsed."""
    out = []
    for line in lines:
        text = line.lstrip(b"# ").removeprefix(b"HELP ").removeprefix(b"TYPE ")
        if text.startswith(_PREFIXES):
            out.append(line)
    return out


_PREFIXES = tuple(name.encode() for name in _SERIES)


class Scraper:
    """One HTTP session for every scrape of the operator (short timeouts: a slow pod waits).

    The page comes from a pod whose image the tenant chose, so it is read as untrusted:
    no redirect is followed (it could point the operator at any address), at most
    ``MAX_PAGE_BYTES`` are read (a bigger page is dropped, not buffered), and only the
    lines of the series progress needs are kept for parsing.
    """

    def __init__(self, timeout_seconds: float = 3.0, max_bytes: int = MAX_PAGE_BYTES):
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str) -> str | None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    return None  # a redirect (3xx) included: never followed
                return await self._read_bounded(response)
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            return None  # the pod is starting, restarting or gone: try again next time

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> str | None:
        kept: list[bytes] = []
        pending, total = b"", 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > self._max_bytes:
                return None  # stop reading: the rest of the page never enters memory
            *lines, pending = (pending + chunk).split(b"\n")
            kept += keep_series(lines)
        kept += keep_series([pending])
        return b"\n".join(kept).decode("utf-8") + "\n"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
