"""HA as the chart installs it: replicas with the same flags (``--peering``, ``--priority
auto``) share a ClusterKopfPeering; one acts, the other stands by and takes over."""

from __future__ import annotations

import asyncio

import pytest
from chart_harness import VALUE_SETS, one, operator_args, render
from operator_harness import RUNS, JobPlayer, cluster_api, run_manifest, running_operator
from test_chart_rbac import declare_cluster_extras

from visionr1_operator.cluster.__main__ import kopf_options, parse_args
from visionr1_operator.cluster.metrics import OperatorMetrics

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"


def jobs_created(metrics: OperatorMetrics) -> float:
    return metrics.api_requests.labels(verb="create", resource="Job")._value.get()


async def test_one_replica_acts_and_the_other_takes_over_when_it_goes():
    values = VALUE_SETS["ha"]
    argv = operator_args(values)
    # Two replicas of the Deployment: the same flags, each parsed on its own (so each
    # draws its own priority, as two pods would).
    first, second = (kopf_options(parse_args(argv)) for _ in range(2))
    low, high = sorted((first, second), key=lambda options: options[1]["priority"])
    assert low[1]["priority"] < high[1]["priority"]
    peering = one(render(values), "ClusterKopfPeering")
    low_metrics, high_metrics = OperatorMetrics(), OperatorMetrics()
    async with cluster_api() as api:
        declare_cluster_extras(api)
        await api.create(PEERINGS, peering)
        name = peering["metadata"]["name"]
        player = JobPlayer(api)

        def peers() -> dict:
            obj = api.get(PEERINGS, None, name) or {}
            return obj.get("status") or {}

        async with running_operator(api, options=low, metrics=low_metrics):
            async with running_operator(api, options=high, metrics=high_metrics):
                await api.wait_for(lambda: len(peers()) == 2, what="both replicas in the peering object")
                assert sorted(p["priority"] for p in peers().values()) == [low[1]["priority"], high[1]["priority"]]
                await asyncio.sleep(0.3)  # the first replica has seen the second and paused
                await api.create(RUNS, run_manifest("ha1"))
                await api.wait_job("ha1-bridge-1")
                await player.succeed("ha1-bridge-1")
                await api.wait_job("ha1-sft-1")
                await asyncio.sleep(0.5)
                # The higher priority replica did the work; the other one only stood by.
                assert (jobs_created(high_metrics), jobs_created(low_metrics)) == (2, 0)
            # The active replica is gone (it removes itself from the peering object on the
            # way out): the standby resumes and carries the run on from its status.
            await api.wait_for(lambda: len(peers()) == 1, what="the stopped replica gone from the peering")
            await player.succeed("ha1-sft-1")
            await api.wait_job("ha1-ptst-1-1", timeout=30)
            # It may first try sft's Job again (its index still filling): a 409, then adopted.
            assert jobs_created(low_metrics) >= 1
        assert sorted(api.job_names()) == ["ha1-bridge-1", "ha1-ptst-1-1", "ha1-sft-1"]
