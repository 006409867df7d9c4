"""`python -m visionr1_operator`: run the VisionR1Run operator.

In a cluster it uses its ServiceAccount; outside, a kubeconfig (``--kubeconfig``,
``$KUBECONFIG`` or ``~/.kube/config``). It watches every namespace unless told
``--namespace`` (repeatable; globs such as ``research-*`` work).

High availability: run two or more replicas with the same ``--peering`` name and
different ``--priority``. kopf's peering (the ``KopfPeering`` / ``ClusterKopfPeering``
resources, installed with the chart) keeps exactly one replica active; the others
stand by and take over, from the runs' status and the existing Jobs, when it goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import kopf

from . import __version__
from .controller import OperatorConfig
from .handlers import register
from .metrics import OperatorMetrics
from .plan import DEFAULT_TRAINER_IMAGE
from .reconcile import ReconcileSettings

DEFAULT_PEERING = "visionr1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m visionr1_operator",
        description="Run VisionR1Runs as one Kubernetes Job per stage (bridge, SFT, PTST/GRPO, eval).",
    )
    p.add_argument("--version", action="version", version=f"visionr1-operator {__version__}")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--kubeconfig", help="kubeconfig file when running outside the cluster")
    p.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE,
                   help="trainer image for stages whose run names none (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (/healthz); 0 disables")
    ha = p.add_mutually_exclusive_group()
    ha.add_argument("--peering", metavar="NAME",
                    help="HA: require the kopf peering NAME; one replica per peering is active")
    ha.add_argument("--standalone", action="store_true", help="no peering: this replica is always active")
    p.add_argument("--priority", type=int, default=0, help="peering priority (the highest active replica wins)")
    p.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between reads of a running stage's metrics (default: %(default)s)")
    p.add_argument("--retry-base", type=float, default=10.0,
                   help="seconds before the first retry of a failed attempt; doubles each time")
    p.add_argument("--retry-max", type=float, default=300.0, help="longest delay between retries")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        reconcile=ReconcileSettings(
            default_image=args.trainer_image,
            retry_base_seconds=args.retry_base,
            retry_max_seconds=args.retry_max,
        ),
        progress_interval=args.progress_interval,
    )


def use_kubeconfig(path: str) -> None:
    """Make kopf's login (through the kubernetes client) read ``path``.

    The client takes its default file from $KUBECONFIG when it is imported, which kopf
    has done by now: set both, the environment for anything that reads it later.
    """
    import kubernetes.config.kube_config

    os.environ["KUBECONFIG"] = path
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kubeconfig:
        use_kubeconfig(args.kubeconfig)
    kopf.configure(log_format=kopf.LogFormat.FULL, verbose=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    settings = kopf.OperatorSettings()
    settings.peering.name = DEFAULT_PEERING  # used if its peering resource exists (or --peering)
    memo = kopf.Memo(config=operator_config(args), metrics=metrics)
    kopf.run(
        registry=register(kopf.get_default_registry()),
        settings=settings,
        memo=memo,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
