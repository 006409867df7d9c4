"""The controllers' API calls share a bound on how many are in flight (kube.API_CONCURRENCY)."""

from __future__ import annotations

import asyncio

import kopf

from visionr1_operator.cluster import kube
from visionr1_operator.cluster.controller import Operator, OperatorConfig
from visionr1_operator.cluster.reconcile import ReconcileSettings


def test_api_calls_in_flight_are_bounded_across_controllers():
    """kopf's client opens a TLS connection (a 256 KiB buffer and OpenSSL's state) for every
    request that finds none idle: 500 runs reconciling at once held 100. Every controller's
    Kube shares the operator's slots, so at most API_CONCURRENCY calls are in flight."""

    async def scenario() -> int:
        operator = Operator(config=OperatorConfig(reconcile=ReconcileSettings(default_image="x")),
                            settings=kopf.OperatorSettings())
        in_flight = peak = 0

        async def request(url, *, settings, logger, **_):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return {"url": url}

        clients = [kube.Kube(operator.settings, logger=None, slots=operator.api_slots) for _ in range(10)]
        answers = await asyncio.gather(*(c._call(request, f"/{i}") for i in range(20) for c in clients))
        assert [a["url"] for a in answers] == [f"/{i}" for i in range(20) for _ in clients]
        return peak

    assert asyncio.run(scenario()) == kube.API_CONCURRENCY


def test_the_run_body_kopf_keeps_loses_its_managed_fields():
    """kopf keeps each run's latest body as long as the run exists (for its daemon); the
    run's event handler drops managedFields from it, which the operator never reads."""
    from visionr1_operator.cluster.handlers import forget_managed_fields

    raw = {"metadata": {"name": "r", "uid": "u", "managedFields": [{"manager": "kubectl"}], "generation": 2},
           "spec": {"suspend": False}, "status": {"phase": "Running"}}
    body = kopf.Body(raw)
    forget_managed_fields(body)
    assert "managedFields" not in raw["metadata"] and "managedFields" not in body.metadata
    assert (body.metadata.name, body.metadata.uid, body.metadata["generation"]) == ("r", "u", 2)
    assert body.spec == {"suspend": False} and body.status == {"phase": "Running"}
    forget_managed_fields(kopf.Body({"spec": {}}))  # no metadata: nothing to do
