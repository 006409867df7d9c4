"""Stage metrics: a Prometheus endpoint and a JSONL log with the same numbers.

Every series is a gauge named ``visionr1_<key>`` with labels ``run`` and ``stage``; the
operator reads ``visionr1_step``, ``visionr1_total_steps``, ``visionr1_reward_mean`` and
``visionr1_completion_length_mean`` from the pod to show progress in the run's status,
and the local executor and ``visionr1 report`` read the JSONL log. Each stage gets its
own registry (not the global one), so tests and a process that runs two stages do not
collide on series.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PREFIX = "visionr1_"
METRICS_LOG = "metrics.jsonl"  # the log's name in a stage's work dir and in its checkpoints
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StageMetrics:
    """Per-step metrics of one stage, exported to Prometheus and appended to a JSONL file."""

    def __init__(self, run: str, stage: str, port: int = 0, jsonl_path: str | Path | None = None):
        self.run, self.stage, self.port = run, stage, port
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._server = None
        self._file = None

    def start(self) -> StageMetrics:
        """Open the log and, when a port is set, serve ``/metrics`` on it."""
        if self.jsonl_path is not None and self._file is None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: a killed stage leaves every finished line on disk.
            self._file = self.jsonl_path.open("a", buffering=1)
        if self.port and self._server is None:
            self._server, _ = start_http_server(self.port, registry=self.registry)
        return self

    @property
    def bound_port(self) -> int | None:
        return self._server.server_port if self._server else None

    def _gauge(self, key: str) -> Gauge:
        if key not in self._gauges:
            if not _NAME.match(key):
                raise ValueError(f"metric key {key!r} must be snake_case")
            self._gauges[key] = Gauge(
                PREFIX + key, key.replace("_", " "), ["run", "stage"], registry=self.registry
            )
        return self._gauges[key]

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record one step: gauges for the numeric values, one JSONL line for all of them."""
        numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in {"step": step, **numeric}.items():
            self._gauge(key).labels(run=self.run, stage=self.stage).set(value)
        self._write({"type": "step", "time": time.time(), "stage": self.stage, "step": step, **values})

    def set(self, **values: float) -> None:
        """Set gauges that are not per step (``total_steps``, ``samples_total``...).

        Also logged, so a reader of the log (the local executor's progress bar) knows
        the totals too.
        """
        for key, value in values.items():
            self._gauge(key).labels(run=self.run, stage=self.stage).set(float(value))
        self._write({"type": "set", "time": time.time(), "stage": self.stage, **values})

    def event(self, kind: str, **fields: Any) -> None:
        """A JSONL event (start, checkpoint, resume, end...)."""
        self._write({"type": kind, "time": time.time(), "stage": self.stage, **fields})

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")

    def rewind(self, step: int, saved: Path | None = None) -> None:
        """After a resume at ``step``, make the log hold each step up to it exactly once.

        ``saved`` is the log committed with the checkpoint resumed from: a fresh pod
        starts with an empty work dir and gets its log back from there. A local re-run
        still has its own log, possibly with steps after the checkpoint (they run again)
        or, at step 0, steps of an attempt that never committed: those lines go.
        """
        path = self.jsonl_path
        if path is None:
            return
        if saved is not None and saved.exists():
            lines = saved.read_text().splitlines()
        elif path.exists() and step:
            lines = path.read_text().splitlines()
        else:
            lines = []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill
            if record.get("type") != "step" or record.get("step", 0) <= step:
                kept.append(line)
        reopen = self._file is not None
        self.close_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in kept))
        if reopen:
            self._file = path.open("a", buffering=1)

    def close_log(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StageMetrics:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path, kind: str | None = "step") -> list[dict[str, Any]]:
    """Records of a metrics log (only ``kind`` records unless None); a torn last line is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the process was killed mid-line
        if kind is None or record.get("type") == kind:
            out.append(record)
    return out
