"""The operator logs in without the kubernetes client where kopf's own readers do the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from visionr1_operator.cluster import login

CA = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="


def kubeconfig(tmp_path: Path, cluster: dict, user: dict) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}],
    }))
    return str(path)


def test_plain_kubeconfigs_are_read_by_kopf_the_rest_by_the_client(tmp_path):
    server = {"server": "https://127.0.0.1:6443", "certificate-authority-data": CA}
    assert login.plain_kubeconfig(kubeconfig(tmp_path, server, {"token": "t"}))
    assert login.plain_kubeconfig(kubeconfig(tmp_path, {**server, "certificate-authority": "/etc/ca.crt"},
                                             {"client-certificate": "/c.crt", "client-key": "/c.key"}))
    # Exec plugins, auth providers, token files, relative paths, tls-server-name: the client.
    for cluster, user in (
        (server, {"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}}),
        (server, {"auth-provider": {"name": "gcp"}}),
        (server, {"tokenFile": "/var/token"}),
        (server, {"client-certificate": "certs/c.crt", "client-key": "/c.key"}),
        ({**server, "tls-server-name": "api"}, {"token": "t"}),
    ):
        assert not login.plain_kubeconfig(kubeconfig(tmp_path, cluster, user)), (cluster, user)
    assert not login.plain_kubeconfig(str(tmp_path / "missing"))
    assert not login.plain_kubeconfig(f"{tmp_path}/a:{tmp_path}/b")  # a merged list
    (tmp_path / "broken").write_text("current-context: nowhere\n")
    assert not login.plain_kubeconfig(str(tmp_path / "broken"))


def test_kubeconfig_path_follows_the_flag_then_the_environment(tmp_path):
    assert login.kubeconfig_path(["--kubeconfig=/a"], {"KUBECONFIG": "/b"}) == "/a"
    assert login.kubeconfig_path(["-n", "x", "--kubeconfig", "/a"], {}) == "/a"
    assert login.kubeconfig_path([], {"KUBECONFIG": "/b"}) == "/b"
    assert login.kubeconfig_path([], {"HOME": str(tmp_path)}) is None


def test_in_cluster_needs_the_service_address_and_a_token(tmp_path):
    (tmp_path / "token").write_text("t")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert login.in_cluster(env, tmp_path)
    assert not login.in_cluster({}, tmp_path) and not login.in_cluster(env, tmp_path / "none")


def _imports(args: list[str], env: dict) -> dict:
    code = ("import json, sys; sys.argv[1:] = " + json.dumps(args) + "; import visionr1_operator.__main__ as m; "
            "print(json.dumps({'lean': m.LEAN, 'kubernetes': sys.modules.get('kubernetes') is not None}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_entry_point_keeps_the_client_out_only_for_plain_credentials(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))}
    env["HOME"] = str(tmp_path)
    plain = kubeconfig(tmp_path, {"server": "https://127.0.0.1:6443", "certificate-authority-data": CA},
                       {"token": "t"})
    assert _imports([f"--kubeconfig={plain}"], env) == {"lean": True, "kubernetes": False}
    (tmp_path / "exec").mkdir()
    cloud = kubeconfig(tmp_path / "exec", {"server": "https://x"}, {"exec": {"command": "aws"}})
    assert _imports([f"--kubeconfig={cloud}"], env) == {"lean": False, "kubernetes": True}


def test_in_cluster_login_reads_the_service_account_as_the_client(tmp_path, monkeypatch):
    import kopf

    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "ca.crt").write_text("ca")
    (tmp_path / "namespace").write_text("ops")
    monkeypatch.setattr(login, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    info = login.login(settings=kopf.OperatorSettings())
    assert (info.server, info.token, info.ca_path, info.default_namespace) == (
        "https://[fd00::1]:443", "tok", str(tmp_path / "ca.crt"), "ops")
