"""`python -m visionr1_operator`: flags -> settings, and the process starts and stops."""

from __future__ import annotations

import os

import kubernetes.config.kube_config as kube_config

from visionr1_operator.cluster.__main__ import build_parser, operator_config, use_kubeconfig
from visionr1_operator.plan import DEFAULT_TRAINER_IMAGE


def test_defaults_watch_every_namespace_with_the_default_image():
    args = build_parser().parse_args([])
    assert args.namespace == [] and not args.standalone and args.peering is None
    config = operator_config(args)
    assert config.reconcile.default_image == DEFAULT_TRAINER_IMAGE
    assert (config.reconcile.retry_base_seconds, config.reconcile.retry_max_seconds) == (10.0, 300.0)
    assert config.progress_interval == 30.0
    assert (args.metrics_port, args.health_port) == (8080, 8081)


def test_flags():
    args = build_parser().parse_args([
        "-n", "research", "-n", "team-*", "--peering", "visionr1-ha", "--priority", "100",
        "--trainer-image", "registry.example.com/trainer:1", "--progress-interval", "5",
        "--retry-base", "1", "--retry-max", "60",
    ])
    assert args.namespace == ["research", "team-*"] and args.peering == "visionr1-ha" and args.priority == 100
    config = operator_config(args)
    assert config.reconcile.default_image == "registry.example.com/trainer:1"
    assert (config.reconcile.retry_base_seconds, config.reconcile.retry_max_seconds) == (1.0, 60.0)
    assert config.progress_interval == 5.0


def test_kubeconfig_flag_reaches_the_clients_default(tmp_path, monkeypatch):
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    monkeypatch.setenv("KUBECONFIG", "unset")
    path = str(tmp_path / "kubeconfig")
    use_kubeconfig(path)
    assert kube_config.KUBE_CONFIG_DEFAULT_LOCATION == path and os.environ["KUBECONFIG"] == path


def test_no_cluster_scan_needs_exact_namespaces(capsys):
    import pytest

    from visionr1_operator.cluster.__main__ import kopf_options, parse_args

    args = parse_args(["-n", "research", "--no-cluster-scan"])
    settings, options = kopf_options(args)
    assert settings.scanning.disabled and options["namespaces"] == ["research"] and not options["clusterwide"]
    for argv, said in ((["-n", "team-*", "--no-cluster-scan"], "'team-*' is a pattern"),
                       (["--no-cluster-scan"], "needs --namespace")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
    settings, options = kopf_options(parse_args([]))
    assert not settings.scanning.disabled and options["clusterwide"] and options["standalone"] is None


def test_priority_auto_gives_replicas_different_priorities(capsys):
    import pytest

    from visionr1_operator.cluster.__main__ import parse_args

    priorities = {parse_args(["--peering", "vr1", "--priority", "auto"]).priority for _ in range(20)}
    assert len(priorities) == 20 and all(p > 0 for p in priorities)  # a tie would pause every replica
    assert parse_args(["--priority", "7"]).priority == 7
    with pytest.raises(SystemExit):
        parse_args(["--priority", "high"])
    assert "expected an integer or 'auto'" in capsys.readouterr().err
