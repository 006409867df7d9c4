"""Operator benchmark on the real control plane with kwok nodes (``operator_bench.py --cluster``).

    .venv/bin/python bench/operator_bench.py --cluster --runs 500

The test control plane (tests/cluster/: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler from Kubernetes' source, kwok's fake nodes) is started for the bench,
with the API server's audit log on. ``--runs`` runs of five stages are created at once;
the real Job controller runs every stage's Job, the scheduler binds its pod to a fake
node (``--nodes`` of ``--gpus-per-node`` GPUs, enough for every run at once), and a kwok
Stage ends each pod with exit 0 ``--stage-seconds`` (up to ``--stage-seconds +
--jitter``) after it started. The operator runs as its own process, as deployed.

Measured, per stage transition (stage N's Job Complete -> stage N+1's Job created):
- latency, between the two watch events the API server sent (one watch on the Jobs,
  stamped on arrival): p50, p99, max;
- writes, from the API server's audit log: every create, patch, update and delete whose
  user agent is the operator's (kopf's client), attributed to the run by the object's
  name (an Event by the object it is about), counted from stage N's Job Complete to
  stage N+1's Job Complete;
- the operator's resident memory (peak, sampled every 0.5 s) and CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from controlplane import ControlPlane, free_port  # noqa: E402
from kwok_stages import exit_stage  # noqa: E402
from operator_harness import run_manifest  # noqa: E402
from watch import Watch  # noqa: E402

STAGES = ["bridge", "sft", "ptst-1", "ptst-2", "eval"]
NAMESPACE = "bench"
WRITE_VERBS = {"create", "patch", "update", "delete"}
_STAGE_OBJECT = re.compile(r"^(.*)-(bridge|sft|ptst-\d+|eval)-(\d+)(-.*)?$")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _job_projection(obj: dict) -> dict:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {"complete": any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)}


def _run_projection(obj: dict) -> dict:
    return {"phase": (obj.get("status") or {}).get("phase")}


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def operator_writes(audit_log: Path) -> tuple[dict[str, list[float]], Counter, int, Counter]:
    """The operator's writes from the audit log: times by run, counts by verb and resource,
    and the refused ones by verb, resource and HTTP code (counted among the writes too)."""
    by_run: dict[str, list[float]] = defaultdict(list)
    counts: Counter = Counter()
    refused: Counter = Counter()
    unattributed = 0
    with audit_log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or event.get("verb") not in WRITE_VERBS:
                continue
            if not str(event.get("userAgent", "")).startswith("kopf"):
                continue
            ref = event.get("objectRef") or {}
            if ref.get("namespace") != NAMESPACE:
                continue
            resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[f"{event['verb']} {resource}"] += 1
            code = (event.get("responseStatus") or {}).get("code") or 0
            if code >= 400:
                refused[f"{event['verb']} {resource} {code}"] += 1
            name = ref.get("name") or ""
            if ref.get("resource") == "events":
                name = ((event.get("requestObject") or {}).get("involvedObject") or {}).get("name", "")
            run = name if ref.get("resource") in ("visionr1runs", "events") else None
            if run is None:
                match = _STAGE_OBJECT.match(name)
                run = match.group(1) if match else None
            if run is None:
                unattributed += 1
                continue
            by_run[run].append(_epoch(event["requestReceivedTimestamp"]))
    return by_run, counts, unattributed, refused


_JOB_PODS = re.compile(r"job-name(?:%3D|=)([a-z0-9-]+)")


def operator_steps(audit_log: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """When the API server received and finished the operator's requests of a transition:
    (step, object) -> (received, done), for its pod listing of a finished Job (by the Job's
    name), and its creates of the next attempt's ConfigMap and Job."""
    steps: dict[tuple[str, str], tuple[float, float]] = {}
    with audit_log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or not str(event.get("userAgent", "")).startswith("kopf"):
                continue
            ref, verb = event.get("objectRef") or {}, event.get("verb")
            if verb == "list" and ref.get("resource") == "pods":
                match = _JOB_PODS.search(event.get("requestURI", ""))
                key = ("list pods", match.group(1)) if match else None
            elif verb == "create" and ref.get("resource") in ("configmaps", "jobs") and ref.get("name"):
                key = (f"create {ref['resource']}", ref["name"])
            else:
                key = None
            if key is not None and key not in steps:
                steps[key] = (_epoch(event["requestReceivedTimestamp"]), _epoch(event["stageTimestamp"]))
    return steps


def step_breakdown(transitions: list[tuple[float, str, str, float]], steps: dict) -> dict:
    """Where a transition's time goes, p50/p99 of each step (seconds), from the watch events
    (Complete, ADDED) and the audit log: the operator's reaction (Complete -> it lists the
    finished Job's pods: the watch event's delivery, kopf, the wake-up), the API server's
    answer to that listing, the operator's decision and the ConfigMap it builds (listing
    done -> ConfigMap create received), the API server's create, the operator again (->
    Job create received), the API server's create of the Job, and its ADDED event's delivery."""
    names = ("reaction (Complete -> pod list received)", "pod list (API server)",
             "decide + build (pod list done -> ConfigMap create received)", "ConfigMap create (API server)",
             "ConfigMap done -> Job create received", "Job create (API server)", "Job ADDED delivered")
    parts: dict[str, list[float]] = {n: [] for n in names}
    for t0, done_job, next_job, t1 in transitions:
        pods, cm, job = (steps.get(("list pods", done_job)), steps.get(("create configmaps", next_job)),
                         steps.get(("create jobs", next_job)))
        if not (pods and cm and job) or not (t0 <= pods[0] <= cm[0] <= job[0]):
            continue
        for name, value in zip(names, (pods[0] - t0, pods[1] - pods[0], cm[0] - pods[1], cm[1] - cm[0],
                                       job[0] - cm[1], job[1] - job[0], t1 - job[1])):
            parts[name].append(value)
    return {"transitions": len(parts[names[0]]),
            **{n: {"p50": round(percentile(v, 50), 3), "p99": round(percentile(v, 99), 3)} for n, v in parts.items()
               if v}}


def bench(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="operator-cluster-bench-") as tmp:
        work = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        plane = ControlPlane(work / "cluster", nodes=args.nodes, gpus_per_node=args.gpus_per_node, audit=True,
                             controller_qps=args.controller_qps, log=lambda line: print(line, file=sys.stderr))
        plane.start(timeout=300)
        try:
            return _measure(args, plane, work)
        finally:
            plane.stop()


def _measure(args: argparse.Namespace, plane: ControlPlane, work: Path) -> dict:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    plane.wait_established("visionr1runs.visionr1.io")
    plane.kubectl_apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n")
    while plane.kubectl("get", "serviceaccount", "default", "-n", NAMESPACE, check=False).returncode != 0:
        time.sleep(0.3)
    plane.kubectl_apply(exit_stage("bench-pods", {}, exit_code=0, after_seconds=args.stage_seconds,
                                   up_to_seconds=args.stage_seconds + args.jitter, namespace=NAMESPACE))
    names = [f"run-{i:04d}" for i in range(args.runs)]
    health = free_port()
    flags = ["--standalone", f"--kubeconfig={plane.kubeconfig}", "--namespace", NAMESPACE, "--metrics-port=0",
             f"--health-port={health}", "--progress-interval=3600"]
    command = [sys.executable, "-m", "visionr1_operator", *flags]
    if args.profile:  # operator_bench.py's --profile: cProfile's stats, written when the operator exits
        command = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "visionr1_operator", *flags]
    if args.tracemalloc:
        command = [sys.executable, "-X", "tracemalloc=12", "-c", _TRACED.format(out=repr(str(Path(args.tracemalloc)))),
                   *flags]
    log = (work / "operator.log").open("w")
    jobs = Watch(plane, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", project=_job_projection)
    runs = Watch(plane, f"/apis/visionr1.io/v1alpha1/namespaces/{NAMESPACE}/visionr1runs", project=_run_projection)
    memory: list[float] = []
    with jobs, runs:
        operator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        process = psutil.Process(operator.pid)
        try:
            _wait_healthy(health, operator)
            time.sleep(2.0)
            idle = process.memory_info().rss / 2**20
            if args.tracemalloc:
                operator.send_signal(signal.SIGUSR1)  # snapshot 1: idle
                time.sleep(3.0)
            started = time.monotonic()
            for chunk in range(0, len(names), 50):
                items = [run_manifest(n, namespace=NAMESPACE) for n in names[chunk:chunk + 50]]
                plane.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                     "items": items}))
            created = time.monotonic()
            traced_at = created + 5.0 if args.tracemalloc else None  # snapshot 2: every run is active
            deadline = started + args.timeout
            done = 0
            while time.monotonic() < deadline:
                memory.append(process.memory_info().rss / 2**20)
                done = _succeeded(runs, names)
                if done == len(names):
                    break
                plane.check_alive()
                if traced_at is not None and time.monotonic() >= traced_at:
                    operator.send_signal(signal.SIGUSR1)
                    traced_at = None
                time.sleep(0.5)
            finished = time.monotonic()
            if args.tracemalloc:  # snapshot 3: the end
                operator.send_signal(signal.SIGUSR1)
                time.sleep(10.0)
            time.sleep(2.0)  # the last status patches and Events land in the audit log
            cpu = process.cpu_times()
        finally:
            operator.send_signal(signal.SIGINT)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
            log.close()
    result = summarize(args, names, jobs.snapshot(), plane.audit_log, memory, idle, started, created, finished)
    result["runs_succeeded"] = done
    result["cpu_seconds"] = {"operator": round(cpu.user + cpu.system, 1)}
    result["watch_reconnects"] = jobs.reconnects + runs.reconnects
    return result


# ``--tracemalloc``: the operator as deployed, traced; each SIGUSR1 writes a snapshot of
# its Python memory (FILE.1.snap, FILE.2.snap, ...: tracemalloc.Snapshot.load, compare_to).
_TRACED = """
import runpy, signal, sys, tracemalloc

taken = [0]

def dump(*_):
    taken[0] += 1
    tracemalloc.take_snapshot().dump({out} + f".{{taken[0]}}.snap")

signal.signal(signal.SIGUSR1, dump)
sys.argv = ["visionr1_operator", *sys.argv[1:]]
runpy.run_module("visionr1_operator", run_name="__main__", alter_sys=True)
"""


def _wait_healthy(port: int, operator: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if operator.poll() is not None:
            raise RuntimeError(f"the operator exited with {operator.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the operator never answered /healthz")


def _succeeded(watch: Watch, names: list[str]) -> int:
    phase: dict[str, str | None] = {}
    for event in watch.snapshot():
        phase[event.name] = event.obj.get("phase")
    return sum(phase.get(n) == "Succeeded" for n in names)


def summarize(args, names, job_events, audit_log: Path, memory, idle, started, created, finished) -> dict:
    added: dict[str, float] = {}
    complete: dict[str, float] = {}
    for event in job_events:
        if event.type == "ADDED":
            added.setdefault(event.name, event.wall)
        if event.obj.get("complete"):
            complete.setdefault(event.name, event.wall)
    writes_by_run, counts, unattributed, refused = operator_writes(audit_log)
    for times in writes_by_run.values():
        times.sort()
    latencies, per_transition, transitions = [], [], []
    for run in names:
        for n in range(len(STAGES) - 1):
            done, nxt = f"{run}-{STAGES[n]}-1", f"{run}-{STAGES[n + 1]}-1"
            t0, t1 = complete.get(done), added.get(nxt)
            if t0 is None or t1 is None:
                continue
            latencies.append(t1 - t0)
            transitions.append((t0, done, nxt, t1))
            end = complete.get(nxt, float("inf"))
            per_transition.append(sum(1 for t in writes_by_run.get(run, []) if t0 <= t < end))
    total_writes = sum(len(w) for w in writes_by_run.values())
    return {
        "mode": "real control plane (kube-apiserver, etcd, kube-controller-manager, kube-scheduler 1.35.4; kwok 0.7)",
        "runs": args.runs,
        "stages_per_run": len(STAGES),
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "stage_seconds": args.stage_seconds,
        "jitter_seconds": args.jitter,
        "controller_manager_qps": args.controller_qps,
        "transitions_measured": len(latencies),
        "wall_seconds": round(finished - started, 1),
        "create_seconds": round(created - started, 1),
        "writes_per_transition": {
            "mean": round(statistics.mean(per_transition), 2) if per_transition else None,
            "max": max(per_transition) if per_transition else None,
            "histogram": {str(k): per_transition.count(k) for k in sorted(set(per_transition))},
        },
        "writes_per_run": round(total_writes / args.runs, 2),
        "writes_unattributed": unattributed,
        "transition_latency_seconds": {
            "p50": round(percentile(latencies, 50), 3) if latencies else None,
            "p99": round(percentile(latencies, 99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
        },
        "transition_steps_seconds": step_breakdown(transitions, operator_steps(audit_log)),
        "operator_rss_mib": {
            "idle": round(idle, 1),
            "peak": round(max(memory), 1) if memory else None,
            "end": round(memory[-1], 1) if memory else None,
        },
        "operator_writes": dict(sorted(counts.items())),
        # kopf's finalizer patches are JSON patches that test metadata.resourceVersion: a 422
        # is one that lost the race to a write of the same run in between (kopf retries it).
        "operator_writes_refused": dict(sorted(refused.items())),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--cluster", "the real control plane")
    group.add_argument("--nodes", type=int, default=8, help="fake nodes (kwok)")
    group.add_argument("--gpus-per-node", type=int, default=64, help="nvidia.com/gpu of each fake node")
    group.add_argument("--controller-qps", type=int, default=200,
                       help="kube-controller-manager's client rate (its default, 20, throttles the Job controller)")
    group.add_argument("--tracemalloc", metavar="FILE",
                       help="trace the operator's Python allocations: snapshots FILE.1.snap (idle), FILE.2.snap "
                            "(5 s after every run is created), FILE.3.snap (the end); slows the operator: not for "
                            "the figures")
    group.add_argument("--keep-dir", help="keep the control plane's logs, the audit log and the operator's log here")
