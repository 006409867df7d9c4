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
