"""Logging in without the ``kubernetes`` client where kopf's own readers do the same.

kopf imports the official client whenever it is installed (to recognise its model
classes, and to log in through it): 42 MiB of the operator's resident memory, about a
fifth of its peak with 500 runs, for a login. The operator makes every API call through
kopf's own client (``kube.py``), so the official one is needed only for credentials kopf
cannot read itself: exec plugins and auth providers (cloud kubeconfigs), token files,
relative certificate paths, ``tls-server-name``, merged kubeconfig lists.

``python -m visionr1_operator`` calls ``choose_login`` before anything imports kopf. Where
the credentials are plain, it keeps the client from being imported (``sys.modules``) and
``login`` reads them as the client would: in a pod, the ServiceAccount's token and CA and
the API server from ``KUBERNETES_SERVICE_HOST``/``PORT`` (the client's in-cluster
loader, which it prefers even when a kubeconfig is named); otherwise the kubeconfig,
through kopf's reader. Anything else logs in through the client exactly as before.
Nothing here imports kopf or the client at module level.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The kubeconfig fields kopf's reader (kopf.login_with_kubeconfig) maps as the client does.
PLAIN_CLUSTER = {"server", "certificate-authority", "certificate-authority-data", "insecure-skip-tls-verify",
                 "proxy-url"}
PLAIN_USER = {"token", "client-certificate", "client-certificate-data", "client-key", "client-key-data",
              "username", "password"}
PATHS = ("certificate-authority", "client-certificate", "client-key")


def in_cluster(environ: Mapping[str, str], account: Path | None = None) -> bool:
    """What the client's in-cluster loader needs: the service's address and a token file."""
    account = SERVICE_ACCOUNT if account is None else account
    return bool(environ.get("KUBERNETES_SERVICE_HOST") and environ.get("KUBERNETES_SERVICE_PORT")
                and (account / "token").is_file())


def kubeconfig_path(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The kubeconfig the operator will read: ``--kubeconfig``, else $KUBECONFIG, else ~/.kube/config."""
    for i, arg in enumerate(argv):
        if arg.startswith("--kubeconfig="):
            return arg.split("=", 1)[1]
        if arg == "--kubeconfig" and i + 1 < len(argv):
            return argv[i + 1]
    if environ.get("KUBECONFIG"):
        return environ["KUBECONFIG"]
    default = Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"
    return str(default) if default.is_file() else None


def plain_kubeconfig(path: str | None) -> bool:
    """True when kopf's kubeconfig reader gets from ``path`` what the client would."""
    if not path or os.pathsep in path or not Path(path).is_file():
        return False
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
        context = _named(config, "contexts", config["current-context"])["context"]
        cluster = _named(config, "clusters", context["cluster"])["cluster"] or {}
        user = _named(config, "users", context["user"])["user"] or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        return False  # the client says what is wrong with it, as before
    if set(cluster) - PLAIN_CLUSTER or set(user) - PLAIN_USER:
        return False
    return all(Path(str(entry[key])).is_absolute() for entry in (cluster, user) for key in PATHS if key in entry)


def _named(config: Mapping[str, Any], section: str, name: str) -> Mapping[str, Any]:
    return next(item for item in config.get(section) or [] if item.get("name") == name)


def choose_login(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Before kopf is imported: keep the client out when the credentials are plain.

    Returns whether it did (``login`` is then the operator's login handler).
    """
    if "kopf" in sys.modules or "kubernetes" in sys.modules:
        return False  # too late (an embedding process): kopf has made its choice
    if not (in_cluster(environ) or plain_kubeconfig(kubeconfig_path(argv, environ))):
        return False
    sys.modules["kubernetes"] = None  # type: ignore[assignment]  # an import of it fails: kopf skips it
    return True


def login(settings: Any, **_: Any) -> Any:
    """kopf's login handler where the client is kept out: in-cluster as the client, else the kubeconfig."""
    import kopf

    if in_cluster(os.environ):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        host = f"[{host}]" if ":" in host else host  # IPv6, as the client writes it
        namespace = SERVICE_ACCOUNT / "namespace"
        ca = SERVICE_ACCOUNT / "ca.crt"
        return kopf.ConnectionInfo(
            server=f"https://{host}:{port}",
            ca_path=str(ca) if ca.is_file() else None,
            token=(SERVICE_ACCOUNT / "token").read_text().strip() or None,  # read again on every re-login
            default_namespace=namespace.read_text().strip() if namespace.is_file() else None,
            trust_env=settings.networking.trust_env,
        )
    return kopf.login_with_kubeconfig(settings=settings)
