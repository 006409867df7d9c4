"""`python -m visionr1_operator`: run the VisionR1Run operator.

In a cluster it uses its ServiceAccount; outside, a kubeconfig (``--kubeconfig``,
``$KUBECONFIG`` or ``~/.kube/config``). It watches every namespace unless told
``--namespace`` (repeatable; globs such as ``research-*`` work).

High availability: run two or more replicas with the same ``--peering`` name and
different priorities (``--priority auto`` draws one, for replicas that share their
flags; equal priorities pause every replica). kopf's peering (the ``KopfPeering`` /
``ClusterKopfPeering`` resources, installed with the chart) keeps exactly one replica
active; the others stand by and take over, from the runs' status and the existing
Jobs, when it goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from typing import Any, Sequence

import kopf

from .. import __version__
from ..plan import DEFAULT_TRAINER_IMAGE
from .admission import Policy
from .controller import OperatorConfig
from .handlers import register
from .login import login
from .metrics import OperatorMetrics
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
    p.add_argument("--priority", type=_priority, default=0,
                   help="peering priority (the highest live replica is active); 'auto': a random one, so the "
                        "replicas of one Deployment, which share their flags, never tie (a tie pauses them all)")
    p.add_argument("--no-cluster-scan", action="store_true",
                   help="do not list/watch Namespaces and CustomResourceDefinitions (cluster-scoped): for an "
                        "operator with namespaced permissions only; needs exact --namespace names")
    p.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between reads of a running stage's metrics (default: %(default)s)")
    p.add_argument("--retry-base", type=float, default=10.0,
                   help="seconds before the first retry of a failed attempt; doubles each time")
    p.add_argument("--retry-max", type=float, default=300.0, help="longest delay between retries")
    policy = p.add_argument_group("policy", "what runs may ask for (repeatable; none given: anything)")
    policy.add_argument("--allow-service-account", action="append", default=[], metavar="NAME",
                        help="a ServiceAccount stage pods may run as ('default' for runs that name none)")
    policy.add_argument("--allow-priority-class", action="append", default=[], metavar="NAME",
                        help="a PriorityClass stage pods may use")
    policy.add_argument("--allow-image-prefix", action="append", default=[], metavar="PREFIX",
                        help="trainer images must start with one of these (e.g. registry.example.com/ml/)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _priority(text: str) -> int:
    if text == "auto":
        return random.SystemRandom().randint(1, 2**31 - 1)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with the checks that involve more than one of them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_cluster_scan:
        patterns = [ns for ns in args.namespace if any(ch in ns for ch in "*?[")]
        if patterns:
            parser.error(f"--no-cluster-scan needs exact --namespace names: {patterns[0]!r} is a pattern, "
                         "and matching it needs the namespaces listed")
        if not args.namespace:
            parser.error("--no-cluster-scan needs --namespace: a cluster-wide operator lists cluster-scoped resources")
    return args


def kopf_options(args: argparse.Namespace) -> tuple[kopf.OperatorSettings, dict[str, Any]]:
    """kopf's settings and ``kopf.run`` keywords for the flags.

    kopf's own API calls follow from these (namespace and CRD scanning, peering), so the
    chart's RBAC is checked against an operator started with exactly these options.
    """
    settings = kopf.OperatorSettings()
    settings.peering.name = DEFAULT_PEERING  # used if its peering resource exists (or --peering)
    settings.scanning.disabled = args.no_cluster_scan
    options: dict[str, Any] = dict(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return settings, options


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        reconcile=ReconcileSettings(
            default_image=args.trainer_image,
            retry_base_seconds=args.retry_base,
            retry_max_seconds=args.retry_max,
        ),
        progress_interval=args.progress_interval,
        policy=Policy(
            service_accounts=tuple(args.allow_service_account),
            priority_classes=tuple(args.allow_priority_class),
            image_prefixes=tuple(args.allow_image_prefix),
        ),
    )


def use_kubeconfig(path: str) -> None:
    """Make kopf's login (through the kubernetes client) read ``path``.

    The client takes its default file from $KUBECONFIG when it is imported, which kopf
    has done by now: set both, the environment for anything that reads it later (kopf's
    own reader, where the client is kept out: ``login.choose_login``).
    """
    os.environ["KUBECONFIG"] = path
    if sys.modules.get("kubernetes") is not None:
        import kubernetes.config.kube_config

        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path


def main(argv: Sequence[str] | None = None, lean_login: bool = False) -> int:
    """``lean_login``: ``login.choose_login`` kept the kubernetes client out; ``login.login`` logs in."""
    args = parse_args(argv)
    if args.kubeconfig:
        use_kubeconfig(args.kubeconfig)
    kopf.configure(log_format=kopf.LogFormat.FULL, verbose=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    settings, options = kopf_options(args)
    memo = kopf.Memo(config=operator_config(args), metrics=metrics)
    registry = register(kopf.get_default_registry())
    if lean_login:
        kopf.on.login(registry=registry, id="login")(login)
    kopf.run(registry=registry, settings=settings, memo=memo, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
