"""Lifecycle bugs the emulator hides, on the real control plane (issue 14, items 1, 4, 6, 7, 8).

The real Job, TTL-after-finished and garbage-collector controllers, the real scheduler,
admission (ResourceQuota, ValidatingAdmissionPolicy) and the real watch; kwok plays the
kubelet (``kwok_stages.exit_stage`` ends a stage's pods with a chosen code and exit
summary). The operator runs as a process (``python -m visionr1_operator``) with the
admin kubeconfig.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from cluster_harness import ensure_namespace, get_json, wait_until
from kwok_stages import exit_stage
from operator_harness import run_manifest

from visionr1_operator.cluster.naming import LABEL_RUN, LABEL_STAGE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[1]

# What every watch of the operator receives from the API server, one JSON line per event
# or listed item (the URL asked and the object's kind and name): kopf's client is wrapped
# in the operator's own process, before kopf starts.
WATCH_PROBE = r'''
import json, os, runpy, sys
from kopf._cogs.clients import api

_log = open(os.environ["WATCH_PROBE_LOG"], "a", buffering=1)
_stream, _get = api.stream, api.get

def _note(url, obj):
    meta = (obj or {}).get("metadata") or {}
    _log.write(json.dumps({"url": url, "kind": (obj or {}).get("kind"), "name": meta.get("name")}) + "\n")

async def stream(url, **kwargs):
    async for event in _stream(url, **kwargs):
        if isinstance(event, dict):
            _note(url, event.get("object"))
        yield event

async def get(url, **kwargs):
    result = await _get(url, **kwargs)
    if isinstance(result, dict) and result.get("kind", "").endswith("List"):
        for item in result.get("items") or []:
            _note(url, {**item, "kind": result["kind"][:-4]})
    return result

api.stream, api.get = stream, get
sys.argv = ["visionr1_operator", *sys.argv[1:]]
runpy.run_module("visionr1_operator", run_name="__main__")
'''


def apply_crd(cluster) -> None:
    """The CRD of this checkout (``VISIONR1_TEST_CRD`` names another file to test against)."""
    path = os.environ.get("VISIONR1_TEST_CRD") or str(ROOT / "crds")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", path)
    cluster.wait_established("visionr1runs.visionr1.io")
    cluster.wait_for_resource("vr1")


@contextlib.contextmanager
def operator(cluster, log: Path, *args: str, probe: Path | None = None) -> Iterator[subprocess.Popen]:
    from controlplane import free_port

    entry = ["-c", WATCH_PROBE] if probe is not None else ["-m", "visionr1_operator"]
    cmd = [sys.executable, *entry, "--standalone", f"--kubeconfig={cluster.kubeconfig}", "--metrics-port=0",
           f"--health-port={free_port()}", "--retry-base=1", "--retry-max=2", *args]
    env = {**os.environ, "POD_ID": "test-operator", **({"WATCH_PROBE_LOG": str(probe)} if probe else {})}
    with log.open("a") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class JobWatch:
    """``kubectl get jobs -w`` in a namespace: every (name, uid) the API server ever served."""

    def __init__(self, cluster, namespace: str):
        from controlplane import kubectl_binary

        self.seen: set[tuple[str, str]] = set()
        self.proc = subprocess.Popen(
            [kubectl_binary(), f"--kubeconfig={cluster.kubeconfig}", "get", "jobs", "-n", namespace, "-w",
             "-o", "jsonpath={.metadata.name} {.metadata.uid}{\"\\n\"}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 2:
                self.seen.add((parts[0], parts[1]))

    def uids(self, name: str) -> set[str]:
        return {uid for n, uid in self.seen if n == name}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def keep_finalizers_stage(name: str, run: str) -> str:
    """kwok's default pod-delete Stage empties a deleted pod's finalizers, which no kubelet
    does; for this run's pods a deleted pod is deleted (grace 0) and its finalizers kept."""
    return yaml.safe_dump({
        "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": [
                {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                {"key": f'.metadata.labels["{LABEL_RUN}"]', "operator": "In", "values": [run]},
            ]},
            "weight": 1,
            "next": {"delete": True},
        },
    }, sort_keys=False)


def run_status(cluster, name: str, namespace: str) -> dict:
    return get_json(cluster, "vr1", name, "-n", namespace).get("status") or {}


def stage(status: dict, name: str) -> dict:
    return next((s for s in status.get("stages") or [] if s["name"] == name), {})


def job_or_none(cluster, name: str, namespace: str) -> dict | None:
    out = cluster.kubectl("get", "job", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def finished(job: dict | None) -> bool:
    return bool(job) and any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                             for c in (job.get("status") or {}).get("conditions") or [])


@pytest.fixture
def crd(cluster):
    apply_crd(cluster)
    return cluster


def test_a_finished_job_gone_past_its_ttl_while_the_operator_was_down_does_not_run_again(crd, tmp_path):
    """Item 1: ttlSecondsAfterFinished 0, the operator stopped while the bridge stage
    finishes: the stage is recorded Succeeded with its pod's exit summary when the operator
    returns, its Job is never created a second time, and the TTL is applied afterwards."""
    cluster, namespace, name = crd, "outcomes-ttl", "ttl"
    ensure_namespace(cluster, namespace)
    cluster.kubectl_apply(keep_finalizers_stage("ttl-keep-finalizers", name))
    summary = {"stage": "bridge", "attempt": 1, "rows": 7}
    cluster.kubectl_apply(exit_stage("ttl-bridge-exits", {LABEL_RUN: name, LABEL_STAGE: "bridge"},
                                     exit_code=0, after_seconds=8, message=json.dumps(summary)))
    doc = run_manifest(name, namespace)
    doc["spec"]["stages"]["bridge"]["ttlSecondsAfterFinished"] = 0
    watch = JobWatch(cluster, namespace)
    log = tmp_path / "operator.log"
    try:
        with operator(cluster, log):
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))
            wait_until(lambda: job_or_none(cluster, "ttl-bridge-1", namespace), 90, "the bridge Job")
        # The operator is down: the Job finishes (and, with the TTL on the Job, would go at once).
        wait_until(lambda: finished(job_or_none(cluster, "ttl-bridge-1", namespace))
                   or job_or_none(cluster, "ttl-bridge-1", namespace) is None, 60, "the bridge Job done")
        time.sleep(5)  # the TTL controller's turn
        with operator(cluster, log):
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Succeeded", 180,
                       "the run Succeeded")
            bridge = stage(run_status(cluster, name, namespace), "bridge")
            # The operator applies the TTL once the outcome is recorded.
            wait_until(lambda: job_or_none(cluster, "ttl-bridge-1", namespace) is None, 60,
                       "the bridge Job deleted after its TTL")
        assert bridge["state"] == "Succeeded" and bridge["attempts"] == 1, bridge
        assert bridge.get("summary") == summary, bridge
        assert len(watch.uids("ttl-bridge-1")) == 1, f"ttl-bridge-1 created again: {watch.uids('ttl-bridge-1')}"
        assert all(len(watch.uids(f"ttl-{s}-1")) == 1 for s in ("sft", "ptst-1", "ptst-2", "eval"))
    finally:
        watch.stop()
        cluster.kubectl("delete", "stage", "ttl-bridge-exits", "ttl-keep-finalizers", check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_failed_attempt_deleted_during_its_retry_backoff_still_counts(crd, tmp_path):
    """Item 1: every failed sft attempt is deleted (kubectl delete) the moment it fails: with
    backoffLimit 1 the stage fails after exactly two attempts, each counted."""
    cluster, namespace, name = crd, "outcomes-backoff", "bo"
    ensure_namespace(cluster, namespace)
    cluster.kubectl_apply(exit_stage("bo-sft-exits-1", {LABEL_RUN: name, LABEL_STAGE: "sft"},
                                     exit_code=1, after_seconds=1))
    stop = threading.Event()
    deleted: list[str] = []

    def delete_failed_jobs() -> None:
        while not stop.is_set():
            out = cluster.kubectl("get", "jobs", "-n", namespace, "-l", f"{LABEL_RUN}={name},{LABEL_STAGE}=sft",
                                  "-o", "json", check=False)
            for job in json.loads(out.stdout or '{"items": []}')["items"] if out.returncode == 0 else []:
                jname = job["metadata"]["name"]
                if finished(job) and not job["metadata"].get("deletionTimestamp"):
                    cluster.kubectl("delete", "job", jname, "-n", namespace, "--wait=false", check=False)
                    deleted.append(jname)
            time.sleep(0.3)

    deleter = threading.Thread(target=delete_failed_jobs, daemon=True)
    try:
        # A backoff longer than the deleter takes: each attempt is gone while its retry waits.
        with operator(cluster, tmp_path / "operator.log", "--retry-base=6", "--retry-max=6"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(name, namespace)))
            deleter.start()
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Failed", 150,
                       "the run Failed after sft's backoffLimit")
            sft = stage(run_status(cluster, name, namespace), "sft")
            # Every deleted attempt goes once the operator has let it go.
            wait_until(lambda: not json.loads(cluster.kubectl(
                "get", "jobs", "-n", namespace, "-l", f"{LABEL_STAGE}=sft", "-o", "json").stdout)["items"],
                60, "the deleted sft Jobs gone")
        assert (sft["state"], sft["attempts"], sft["failures"]) == ("Failed", 2, 2), sft
        assert "backoffLimit 1" in sft["message"], sft["message"]
        assert sorted(set(deleted)) == ["bo-sft-1", "bo-sft-2"], deleted
    finally:
        stop.set()
        cluster.kubectl("delete", "stage", "bo-sft-exits-1", check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_lost_status_patch_after_the_next_attempt_was_created_loses_no_failure(crd, tmp_path):
    """Item 8: the status is set back to attempt 1 with no failure counted while attempt 2's
    Job exists (a crash between creating it and writing the status): the operator counts
    attempt 1's failure again from its Job, so sft fails after its backoffLimit (1) with
    2 failures, not after a third attempt."""
    cluster, namespace, name = crd, "outcomes-lost", "lost"
    ensure_namespace(cluster, namespace)
    cluster.kubectl_apply(exit_stage("lost-sft-exits-1", {LABEL_RUN: name, LABEL_STAGE: "sft"},
                                     exit_code=1, after_seconds=3))
    log = tmp_path / "operator.log"
    try:
        with operator(cluster, log):
            cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(name, namespace)))
            wait_until(lambda: job_or_none(cluster, "lost-sft-2", namespace), 120, "attempt 2 of sft")
        record = stage(run_status(cluster, name, namespace), "sft")
        assert (record["attempts"], record["failures"]) == (2, 1), record
        stages = run_status(cluster, name, namespace)["stages"]
        for s in stages:
            if s["name"] == "sft":
                s.update(attempts=1, failures=0, jobName="lost-sft-1")
        cluster.kubectl("patch", "vr1", name, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"stages": stages}}))
        with operator(cluster, log):
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Failed", 120, "the run Failed")
        sft = stage(run_status(cluster, name, namespace), "sft")
        assert (sft["state"], sft["attempts"], sft["failures"]) == ("Failed", 2, 2), sft
        assert job_or_none(cluster, "lost-sft-3", namespace) is None
    finally:
        cluster.kubectl("delete", "stage", "lost-sft-exits-1", check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_job_create_refused_by_a_quota_fails_the_stage_after_its_backoff_limit(crd, tmp_path):
    """Item 4: a ResourceQuota of zero Jobs makes the real API server refuse every create:
    the run shows the server's message in a condition, retries, and fails the stage
    after its backoffLimit instead of staying Pending forever."""
    cluster, namespace, name = crd, "outcomes-quota", "quota"
    ensure_namespace(cluster, namespace)
    cluster.kubectl_apply(yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota",
                                          "metadata": {"name": "no-jobs", "namespace": namespace},
                                          "spec": {"hard": {"count/jobs.batch": "0"}}}))
    # The test control plane runs no resource-quota controller: its status (what the quota
    # admission plugin enforces) is written here as that controller would.
    cluster.kubectl("patch", "resourcequota", "no-jobs", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"hard": {"count/jobs.batch": "0"}, "used": {"count/jobs.batch": "0"}}}))
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe", "namespace": namespace},
             "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}
    wait_until(lambda: "no-jobs" in cluster.kubectl("create", "--dry-run=server", "-f", "-",
                                                    input=json.dumps(probe), check=False).stderr,
               30, "the quota in force")
    try:
        with operator(cluster, tmp_path / "operator.log"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(name, namespace)))

            def refused_condition():
                ready = next((c for c in run_status(cluster, name, namespace).get("conditions") or []
                              if c["type"] == "Ready"), {})
                return ready if ready.get("reason") == "CreateRefused" else None

            ready = wait_until(refused_condition, 60, "Ready=False reason CreateRefused")
            assert "exceeded quota: no-jobs" in ready["message"], ready
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Failed", 90, "the run Failed")
        status = run_status(cluster, name, namespace)
        bridge = stage(status, "bridge")
        assert (bridge["state"], bridge["failures"]) == ("Failed", 2), bridge  # backoffLimit 1
        assert "no-jobs" in bridge["message"] and "backoffLimit 1" in bridge["message"], bridge
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and "no-jobs" in failed["message"]
    finally:
        cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", namespace, check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_job_refused_by_a_validating_admission_policy_is_reported_and_retried(crd, tmp_path):
    """Item 4: a ValidatingAdmissionPolicy denies the operator's Jobs until it is removed:
    the run carries the policy's message, and the retry after the backoff succeeds."""
    cluster, namespace, name = crd, "outcomes-vap", "vap"
    ensure_namespace(cluster, namespace)
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": "outcomes-no-jobs"},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                               "operations": ["CREATE"], "resources": ["jobs"]}]},
                       "validations": [{"expression": "false", "message": "jobs are frozen in this namespace"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": "outcomes-no-jobs"},
               "spec": {"policyName": "outcomes-no-jobs", "validationActions": ["Deny"],
                        "matchResources": {"namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": namespace}}}}}
    cluster.kubectl_apply(yaml.safe_dump(policy) + "---\n" + yaml.safe_dump(binding))
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe", "namespace": namespace},
             "spec": {"template": {"spec": {"restartPolicy": "Never",
                                            "containers": [{"name": "c", "image": "x"}]}}}}
    wait_until(lambda: "frozen" in cluster.kubectl("create", "--dry-run=server", "-f", "-",
                                                   input=json.dumps(probe), check=False).stderr,
               30, "the policy in force")
    doc = run_manifest(name, namespace)
    doc["spec"]["stages"]["bridge"]["backoffLimit"] = 5
    try:
        with operator(cluster, tmp_path / "operator.log"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))

            def refused():
                ready = next((c for c in run_status(cluster, name, namespace).get("conditions") or []
                              if c["type"] == "Ready"), {})
                return ready if ready.get("reason") == "CreateRefused" else None

            ready = wait_until(refused, 60, "Ready=False reason CreateRefused")
            assert "jobs are frozen in this namespace" in ready["message"], ready
            assert run_status(cluster, name, namespace)["phase"] == "Pending"
            cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                            "outcomes-no-jobs")
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Succeeded", 180,
                       "the run Succeeded once the policy is gone")
        bridge = stage(run_status(cluster, name, namespace), "bridge")
        assert bridge["state"] == "Succeeded" and bridge["failures"] >= 1, bridge
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", "outcomes-no-jobs",
                        check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_run_waiting_for_gpus_looks_waiting_not_running(crd, tmp_path):
    """Item 6: the bridge stage asks for a node label no node has: the scheduler leaves its
    pod Pending (the Job has a startTime and an active pod); the run says Pending,
    Ready=False WaitingForResources, and the stage is not Running."""
    cluster, namespace, name = crd, "outcomes-waiting", "wait"
    ensure_namespace(cluster, namespace)
    doc = run_manifest(name, namespace)
    doc["spec"]["stages"]["bridge"]["resources"] = {"nodeSelector": {"example.com/gpu-model": "none-such"}}
    try:
        with operator(cluster, tmp_path / "operator.log"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))
            job = wait_until(lambda: (j := job_or_none(cluster, "wait-bridge-1", namespace))
                             and (j.get("status") or {}).get("startTime") and j, 60, "the Job started")
            assert (job["status"].get("active") or 0) == 1 and not job["status"].get("ready")
            time.sleep(4)  # several reconciles and watch events later
            status = run_status(cluster, name, namespace)
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert status["phase"] == "Pending", status["phase"]
            assert (ready["status"], ready["reason"]) == ("False", "WaitingForResources"), ready
            assert stage(status, "bridge")["state"] == "Pending"
    finally:
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_the_operator_receives_no_event_of_a_foreign_job(crd, tmp_path):
    """Item 7: Jobs not made by the operator (another team's) are filtered on the API
    server: the operator's watches receive none of their events, not even in its list."""
    cluster, namespace = crd, "outcomes-foreign"
    ensure_namespace(cluster, namespace)
    probe = tmp_path / "watch.jsonl"
    foreign = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"namespace": namespace},
               "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}
    names = [f"foreign-{i}" for i in range(3)]
    for job_name in names[:1]:
        cluster.kubectl("create", "-f", "-", input=json.dumps({**foreign, "metadata": {
            "name": job_name, "namespace": namespace}}))
    with operator(cluster, tmp_path / "operator.log", probe=probe):
        wait_until(lambda: probe.exists() and "/jobs" in probe.read_text(), 60, "the operator's Job watch")
        for job_name in names[1:]:  # created, run and finished while the operator watches
            cluster.kubectl("create", "-f", "-", input=json.dumps({**foreign, "metadata": {
                "name": job_name, "namespace": namespace}}))
        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest("ours", namespace)))
        wait_until(lambda: run_status(cluster, "ours", namespace).get("phase") == "Succeeded", 180, "our run done")
        for job_name in names[1:]:
            wait_until(lambda: finished(job_or_none(cluster, job_name, namespace)), 60, f"{job_name} done")
        time.sleep(2)
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    jobs_seen = [e for e in seen if "/jobs" in e["url"]]
    assert any(e["name"] == "ours-bridge-1" for e in jobs_seen), jobs_seen[:5]
    assert not [e for e in jobs_seen if (e["name"] or "").startswith("foreign-")], \
        [e for e in jobs_seen if (e["name"] or "").startswith("foreign-")][:5]
    assert all("labelSelector=" in e["url"] for e in jobs_seen), {e["url"] for e in jobs_seen}
    cluster.kubectl("delete", "vr1", "ours", "-n", namespace, "--wait=false", check=False)


def test_generate_name_queue_name_and_conditions_map_as_the_api_server_enforces_them(crd, tmp_path):
    """Item 8 and item 4's validation: a generateName of 36+ characters is refused naming
    generateName (the name made from it would break the 40-character rule), 35 makes a
    40-character run; a queueName that cannot be a label value (over 63 characters) is
    refused; status.conditions is a list map keyed by type (one condition per type)."""
    cluster, namespace = crd, "outcomes-crd"
    ensure_namespace(cluster, namespace)
    doc = run_manifest("x", namespace)
    del doc["metadata"]["name"]
    too_long = cluster.kubectl("create", "-f", "-", check=False,
                               input=json.dumps({**doc, "metadata": {"generateName": "g" * 35 + "-",
                                                                     "namespace": namespace}}))
    assert too_long.returncode != 0 and "metadata.generateName" in too_long.stderr, too_long.stderr
    made = cluster.kubectl("create", "-f", "-", "-o", "name",
                           input=json.dumps({**doc, "metadata": {"generateName": "g" * 34 + "-",
                                                                 "namespace": namespace}}))
    name = made.stdout.strip().rsplit("/", 1)[-1]
    assert len(name) == 40 and name.startswith("g" * 34 + "-"), name

    queued = run_manifest("queued", namespace, queueName="q" * 64)
    refused = cluster.kubectl("create", "-f", "-", input=json.dumps(queued), check=False)
    assert refused.returncode != 0 and "spec.queueName" in refused.stderr, refused.stderr
    fits = run_manifest("queued", namespace, queueName="q" * 63)
    cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(fits))

    crd_object = get_json(cluster, "crd", "visionr1runs.visionr1.io")
    schema = crd_object["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
    twice = [{"type": "Ready", "status": s, "reason": "Test", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
             for s in ("True", "False")]
    duplicate = cluster.kubectl("patch", "vr1", name, "-n", namespace, "--subresource=status", "--type=merge",
                                "-p", json.dumps({"status": {"conditions": twice}}), check=False)
    assert duplicate.returncode != 0 and "Duplicate value" in duplicate.stderr, duplicate.stderr
    cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_a_multi_gpu_stage_with_an_unusable_config_is_not_retried(crd, tmp_path):
    """Item 3: a 2-GPU SFT stage's pod checks its config before torchrun (the pod spec),
    and its exit 2 fails the Job through the podFailurePolicy's first rule: the stage
    fails after one attempt with the trainer's reason, although backoffLimit is 3."""
    cluster, namespace, name = crd, "outcomes-badconfig", "badcfg"
    ensure_namespace(cluster, namespace)
    summary = {"stage": "sft", "error": "bad config: learningRate: Input should be a valid number"}
    cluster.kubectl_apply(exit_stage("badcfg-sft-exits-2", {LABEL_RUN: name, LABEL_STAGE: "sft"},
                                     exit_code=2, after_seconds=1, message=json.dumps(summary)))
    doc = run_manifest(name, namespace)
    doc["spec"]["stages"]["sft"] = {"backoffLimit": 3, "resources": {"gpusPerNode": 2}}
    try:
        with operator(cluster, tmp_path / "operator.log"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))
            job = wait_until(lambda: job_or_none(cluster, "badcfg-sft-1", namespace), 120, "the sft Job")
            (container,) = job["spec"]["template"]["spec"]["containers"]
            command = container["command"]
            assert command[:8] == ["python", "-m", "visionr1_trainer.launch", "sft", "--config",
                                   "/etc/visionr1/stage.json", "--", "torchrun"], command
            assert "--nproc-per-node=2" in command
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
            wait_until(lambda: run_status(cluster, name, namespace).get("phase") == "Failed", 120, "the run Failed")
            failed = job_or_none(cluster, "badcfg-sft-1", namespace)
        sft = stage(run_status(cluster, name, namespace), "sft")
        assert (sft["state"], sft["attempts"], sft.get("failures", 0)) == ("Failed", 1, 0), sft
        assert "could not use its config (not retried)" in sft["message"] and "learningRate" in sft["message"], sft
        reason = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
        assert reason["reason"] == "PodFailurePolicy" and "index 0" in reason["message"], reason
        assert job_or_none(cluster, "badcfg-sft-2", namespace) is None
    finally:
        cluster.kubectl("delete", "stage", "badcfg-sft-exits-2", check=False)
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)


def test_an_adopted_configmap_from_an_older_spec_is_not_used(crd, tmp_path):
    """Item 8: before the operator first sees a run, a ConfigMap of the run's first bridge
    attempt exists with another config (as after a crash between creating it and its Job,
    and a spec edit since). The Job that runs must read the config its config-hash names."""
    cluster, namespace, name = crd, "outcomes-stale", "stale"
    ensure_namespace(cluster, namespace)
    try:
        cluster.kubectl("create", "-f", "-", input=json.dumps(run_manifest(name, namespace)))
        uid = get_json(cluster, "vr1", name, "-n", namespace)["metadata"]["uid"]
        stale = {"apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
                 "metadata": {"name": f"{name}-bridge-1", "namespace": namespace,
                              "labels": {LABEL_RUN: name, LABEL_STAGE: "bridge"},
                              "ownerReferences": [{"apiVersion": "visionr1.io/v1alpha1", "kind": "VisionR1Run",
                                                   "name": name, "uid": uid, "controller": True}]},
                 "data": {"stage.json": '{"stage": "bridge", "attempt": 1, "old": true}\n'}}
        cluster.kubectl("create", "-f", "-", input=json.dumps(stale))
        with operator(cluster, tmp_path / "operator.log"):
            wait_until(lambda: stage(run_status(cluster, name, namespace), "bridge").get("state") == "Succeeded",
                       120, "bridge Succeeded")
            bridge = stage(run_status(cluster, name, namespace), "bridge")
            ran = job_or_none(cluster, bridge["jobName"], namespace)
        volumes = ran["spec"]["template"]["spec"]["volumes"]
        config_map = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
        data = get_json(cluster, "configmap", config_map, "-n", namespace)["data"]["stage.json"]
        assert '"old"' not in data and json.loads(data)["attempt"] == bridge["attempts"], data
        assert ran["metadata"]["annotations"]["visionr1.io/config-hash"] == bridge["configHash"]
    finally:
        cluster.kubectl("delete", "vr1", name, "-n", namespace, "--wait=false", check=False)
