"""Kueue's manager beside the test control plane: its config, CRDs and webhooks.

Kueue (``sigs.k8s.io/kueue``, built by gobuild.py from ``kueue/``) runs as a process on
this machine, outside any cluster, so what its manifests expect from a cluster is given
here instead:

- the config turns off what needs an in-cluster deployment: internal certificate
  management (it would write a Secret and patch the webhook configurations), leader
  election, the metrics server (``bindAddress: "0"``); the webhook server listens on
  127.0.0.1 with a serving certificate signed by the control plane's CA (``pki.py``);
  the only integration is ``batch/job``;
- its CRDs come from the pinned module's ``config/components/crd/bases``; the ones its
  kustomization gives a conversion webhook get it, pointed at the loopback URL;
- its webhook configurations (``config/components/webhook/manifests.yaml``) are kept for
  the resources served here (Jobs and Kueue's own), with ``clientConfig.url`` on the
  loopback port and the CA bundle; the others (pods, Deployments, JobSets, Ray...) would
  send every such create to a handler Kueue does not start for a disabled integration;
- v0.17 reads a metrics certificate from the fixed path ``/etc/kueue/metrics/certs``
  even with the metrics server off: ``ensure_metrics_certs`` writes one there if none
  is there (root only; the error says so).
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

import pki

METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # fixed in cmd/kueue/main.go (v0.17)
SERVED_GROUPS = {"batch", "kueue.x-k8s.io"}
# The CRDs Kueue's kustomization (config/components/crd) gives a conversion webhook.
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
FEATURE_GATES = "VisibilityOnDemand=false"


def config_yaml(webhook_port: int, health_port: int, cert_dir: Path) -> str:
    return yaml.safe_dump({
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
        "clientConnection": {"qps": 100, "burst": 200},
    }, sort_keys=False)


def _client_config(port: int, path: str, ca_b64: str) -> dict:
    return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_b64}


def crds_yaml(source: Path, webhook_port: int, ca_b64: str) -> str:
    docs = []
    for crd_file in sorted((source / "config" / "components" / "crd" / "bases").glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": _client_config(webhook_port, "/convert", ca_b64),
                "conversionReviewVersions": ["v1"]}}
        docs.append(yaml.safe_dump(crd, sort_keys=False))
    return "---\n".join(docs)


def webhooks_yaml(source: Path, webhook_port: int, ca_b64: str) -> str:
    docs = []
    manifests = (source / "config" / "components" / "webhook" / "manifests.yaml").read_text()
    for doc in yaml.safe_load_all(manifests):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= SERVED_GROUPS:
                continue
            hook["clientConfig"] = _client_config(webhook_port, hook["clientConfig"]["service"]["path"], ca_b64)
            kept.append(hook)
        doc["webhooks"] = kept
        doc["metadata"]["name"] = f"kueue-{doc['metadata']['name']}"
        docs.append(yaml.safe_dump(doc, sort_keys=False))
    return "---\n".join(docs)


def ensure_metrics_certs(pki_dir: Path) -> None:
    """A certificate where Kueue v0.17 insists on reading one (unused: metrics are off)."""
    if (METRICS_CERT_DIR / "tls.crt").exists() and (METRICS_CERT_DIR / "tls.key").exists():
        return
    try:
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
        scratch = METRICS_CERT_DIR.parent / f".certs-{base64.b32encode(__import__('os').urandom(5)).decode()}"
        pki.write_serving_cert(pki_dir, scratch, "kueue-metrics")
        for name in ("tls.crt", "tls.key"):  # renamed into place: a parallel start never reads half a file
            (scratch / name).rename(METRICS_CERT_DIR / name)
        scratch.rmdir()
    except PermissionError as exc:
        raise PermissionError(
            f"Kueue v0.17 reads its metrics certificate from {METRICS_CERT_DIR} (a fixed path); "
            f"create tls.crt and tls.key there, or run as root: {exc}") from exc


def ca_bundle(pki_dir: Path) -> str:
    return base64.b64encode((pki_dir / "ca.crt").read_bytes()).decode()
