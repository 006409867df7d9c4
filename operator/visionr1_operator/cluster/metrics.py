"""The operator's own Prometheus metrics (not the trainer's: those come from the stage pods).

One registry per operator instance, so that tests running several operators in one
process do not collide; ``python -m visionr1_operator`` serves it on ``--metrics-port``.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..api import StageStatus

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
# Stage attempts last minutes to days.
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600, float("inf"))


class _RunsByPhase(Collector):
    """``visionr1_operator_runs{phase}``, counted at scrape time from what the controllers saw."""

    def __init__(self, phases: dict[tuple[str, str], str]):
        self._phases = phases

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("visionr1_operator_runs", "VisionR1Runs by phase", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for phase in list(self._phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.phases: dict[tuple[str, str], str] = {}
        self.registry.register(_RunsByPhase(self.phases))
        self.transitions = Counter(
            "visionr1_operator_stage_transitions", "Stage state changes",
            ["kind", "state"], registry=self.registry,
        )
        self.stage_duration = Histogram(
            "visionr1_operator_stage_duration_seconds", "Stage wall time, first attempt start to end",
            ["kind", "outcome"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "visionr1_operator_reconcile_errors", "Reconciles that failed and were retried",
            ["reason"], registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "visionr1_operator_reconcile_duration_seconds", "Time of one reconcile, API calls included",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf")),
            registry=self.registry,
        )
        self.api_requests = Counter(
            "visionr1_operator_api_requests", "Kubernetes API requests made by the controllers",
            ["verb", "resource"], registry=self.registry,
        )

    def api_request(self, verb: str, resource: str) -> None:
        self.api_requests.labels(verb=verb, resource=resource).inc()

    def observe_run(self, key: tuple[str, str], phase: str | None) -> None:
        if phase is None:
            self.phases.pop(key, None)
        else:
            self.phases[key] = phase

    def observe_stages(self, before: list[StageStatus], after: list[StageStatus], duration_of) -> None:
        """Count state changes between two versions of the stage records."""
        old = {(r.name, r.attempts): r.state for r in before}
        for record in after:
            if old.get((record.name, record.attempts)) == record.state:
                continue
            self.transitions.labels(kind=record.kind, state=record.state).inc()
            if record.state in ("Succeeded", "Failed"):
                seconds = duration_of(record)
                if seconds is not None:
                    self.stage_duration.labels(kind=record.kind, outcome=record.state).observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
