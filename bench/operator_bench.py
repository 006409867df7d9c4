"""Operator benchmark: many VisionR1Runs at once against the Kubernetes API emulator.

    .venv/bin/python bench/operator_bench.py --runs 500
    .venv/bin/python bench/operator_bench.py --cluster --runs 500   # the real control plane

``--cluster`` runs the same load against the real control plane with kwok nodes
(bench/operator_cluster_bench.py): the API server's watch events and audit log measure it.

The emulator (kmock's ``KubernetesEmulator`` with the metadata a real API server keeps,
from ``tests/operator_harness.py``) serves HTTP in this process; the operator runs as
its own process, exactly as deployed: ``python -m visionr1_operator --kubeconfig ...``,
so its memory is its own. This process plays the Job controller: every Job the operator
creates succeeds ``--stage-seconds`` (plus jitter) later. No pods are simulated (the
emulator does not filter label selectors, so a pod listing would return every pod of
the namespace: a cost a real API server does not have).

Measured, per stage transition (stage N's Job marked succeeded -> stage N+1's Job created):
- write requests the operator makes, by the emulator's request log (attributed to the
  run by name, and to the transition by time);
- latency, from the emulator handling the Job's success to it handling the next Job's
  create: p50, p99, max;
- the operator process's resident memory (peak, sampled every 0.25 s).
Results go to ``bench/results/operator_bench.json`` and BENCHMARKS.md ("Operator").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import kmock
import psutil
from kmock._internal.enums import action

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from operator_harness import RUNS, Api, Cluster, now_iso, run_manifest  # noqa: E402

STAGES = ["bridge", "sft", "ptst-1", "ptst-2", "eval"]
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}
# The run a request is about: its own path, a stage object's name, or an Event's involvedObject.
_RUN_PATH = re.compile(r"/visionr1runs/([a-z0-9-]+)")
_STAGE_OBJECT = re.compile(r"^(.*)-(bridge|sft|ptst-\d+|eval)-(\d+)$")


class RecordingCluster(Cluster):
    """The emulator, logging every request with its time, and telling the bench about new Jobs."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.log: list[tuple[float, str, str, str | None, str]] = []  # (t, method, user agent, run, what)
        self.job_created_at: dict[str, float] = {}  # by the operator
        self.job_succeeded_at: dict[str, float] = {}  # by the benchmark's Job controller
        self.on_job_created = lambda name: None

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        ua = request.headers.get("User-Agent", "")
        run, what = self._about(request)
        response = await super()._handle(request)
        t = time.monotonic()  # handled: the object is stored and its watch event sent
        if len(self._requests) > 2000:  # kmock's request log: only the tests read it
            del self._requests[:-100]
        self.log.append((t, request.method.value, ua, run, what))
        if what == "jobs" and response.status < 300:
            if request.action == action.CREATE and ua.startswith("kopf"):
                name = request.data["metadata"]["name"]
                self.job_created_at[name] = t
                self.on_job_created(name)
            elif request.subresource == "status" and _completes(request.data):
                self.job_succeeded_at[request.name] = t
        return response

    @staticmethod
    def _about(request: kmock.Request) -> tuple[str | None, str]:
        """Which run a request concerns, and what it touches (run, run/status, jobs, event...)."""
        plural = request.resource.plural if request.resource is not None else ""
        match = _RUN_PATH.search(request.url.path)
        if match:
            return match.group(1), "run" + (f"/{request.subresource}" if request.subresource else "")
        data = request.data if isinstance(request.data, dict) else {}
        if plural == "events":
            return data.get("involvedObject", {}).get("name"), "event"
        name = request.name or data.get("metadata", {}).get("name") or ""
        found = _STAGE_OBJECT.match(name)
        return (found.group(1) if found else None), plural


def _completes(patch: object) -> bool:
    conditions = (patch or {}).get("status", {}).get("conditions") or [] if isinstance(patch, dict) else []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def kubeconfig(url: str, directory: Path) -> Path:
    path = directory / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
    }))
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class JobController:
    """Marks each of the operator's Jobs succeeded after a simulated stage time."""

    def __init__(self, api: Api, stage_seconds: float, jitter: float):
        self.api, self.stage_seconds, self.jitter = api, stage_seconds, jitter
        self.tasks: set[asyncio.Task] = set()

    def job_created(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _finish(self, name: str) -> None:
        await asyncio.sleep(self.stage_seconds + random.uniform(0, self.jitter))
        now = now_iso()
        status = {"active": 0, "succeeded": 1, "startTime": now, "completionTime": now, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
            {"type": "Complete", "status": "True", "lastTransitionTime": now}]}
        await self.api.patch("batch/v1/jobs", "bench", name, {"status": status}, "status")


async def sample_memory(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append(process.memory_info().rss / 2**20)
        except psutil.Error:
            return
        await asyncio.sleep(0.25)


async def bench(args: argparse.Namespace) -> dict:
    cluster = RecordingCluster()
    cluster.keep_history = 2  # the emulator keeps every version otherwise; this is not the operator's memory
    async with cluster, kmock.Server(cluster) as server:
        api = Api(cluster, str(server.url))
        jobs = JobController(api, args.stage_seconds, args.jitter)
        cluster.on_job_created = jobs.job_created
        with tempfile.TemporaryDirectory() as tmp:
            config = kubeconfig(str(server.url), Path(tmp))
            # All namespaces: kmock 0.8 cannot parse GET /api/v1/namespaces, which kopf's
            # namespace observer needs for --namespace.
            profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
            command = [sys.executable, *profile, "-m", "visionr1_operator", "--kubeconfig", str(config),
                       "--standalone", "--metrics-port", "0", "--health-port", "0", "--progress-interval", "3600"]
            command += ["--verbose"] if args.verbose else []
            log = open(Path(tmp) / "operator.log", "w")
            operator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            memory: list[float] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(operator.pid, memory, stop))
            try:
                await api.wait_for(lambda: _watching(cluster), 60, "the operator to watch runs and Jobs")
                await asyncio.sleep(1.0)
                idle_memory = memory[-1] if memory else None
                started = time.monotonic()
                for i in range(args.runs):
                    await api.create(RUNS, run_manifest(f"run-{i:04d}", namespace="bench"))
                created = time.monotonic()
                deadline = time.monotonic() + args.timeout
                while _succeeded(cluster) < args.runs:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {_succeeded(cluster)} of {args.runs} runs succeeded")
                    await asyncio.sleep(0.5)
                finished = time.monotonic()
                await asyncio.sleep(1.0)  # let the last status patches and Events land
            finally:
                stop.set()
                await sampler
                cpu = _cpu_seconds(operator.pid)
                operator.send_signal(signal.SIGINT)
                try:
                    operator.wait(20)
                except subprocess.TimeoutExpired:
                    operator.kill()
                log.close()
                if args.keep_log:
                    Path(args.keep_log).write_text((Path(tmp) / "operator.log").read_text())
        result = summarize(args, cluster, memory, idle_memory, started, created, finished)
        result["cpu_seconds"] = {"operator": cpu, "emulator_and_bench": round(sum(os.times()[:2]), 1)}
        return result


def _cpu_seconds(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return round(times.user + times.system, 1)


def _watching(cluster: RecordingCluster) -> bool:
    """The operator is up once it has listed (and so watches) both runs and Jobs."""
    listed = {what for _, method, ua, _, what in cluster.log if ua.startswith("kopf") and method == "GET"}
    return {"jobs", "visionr1runs"} <= listed


def _succeeded(cluster: RecordingCluster) -> int:
    """Runs that have succeeded, read in place (a copy of every run would load this process)."""
    count = 0
    for (resource, _, _), obj in list(cluster.objects.items()):
        if resource.plural == "visionr1runs" and not obj.deleted:
            count += (obj.raw.get("status") or {}).get("phase") == "Succeeded"
    return count


def summarize(args, cluster: RecordingCluster, memory, idle_memory, started, created, finished) -> dict:
    writes_by_run: dict[str, list[float]] = defaultdict(list)
    requests: dict[str, int] = defaultdict(int)
    for t, method, ua, run, what in cluster.log:
        if not ua.startswith("kopf"):
            continue
        requests[f"{method} {what}"] += 1
        if method in WRITE_METHODS and run is not None:
            writes_by_run[run].append(t)
    latencies, per_transition = [], []
    for i in range(args.runs):
        run = f"run-{i:04d}"
        for n in range(len(STAGES) - 1):
            done, nxt = f"{run}-{STAGES[n]}-1", f"{run}-{STAGES[n + 1]}-1"
            t0, t1 = cluster.job_succeeded_at.get(done), cluster.job_created_at.get(nxt)
            if t0 is None or t1 is None:
                continue
            latencies.append(t1 - t0)
            end = cluster.job_succeeded_at.get(nxt, float("inf"))
            per_transition.append(sum(1 for t in writes_by_run[run] if t0 <= t < end))
    total_writes = sum(len(w) for w in writes_by_run.values())
    return {
        "runs": args.runs,
        "stages_per_run": len(STAGES),
        "stage_seconds": args.stage_seconds,
        "jitter_seconds": args.jitter,
        "transitions_measured": len(latencies),
        "wall_seconds": round(finished - started, 1),
        "create_seconds": round(created - started, 1),
        "writes_per_transition": {
            "mean": round(statistics.mean(per_transition), 2),
            "max": max(per_transition),
            "histogram": {str(k): per_transition.count(k) for k in sorted(set(per_transition))},
        },
        "writes_per_run": round(total_writes / args.runs, 2),
        "transition_latency_seconds": {
            "p50": round(percentile(latencies, 50), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(max(latencies), 3),
        },
        "operator_rss_mib": {
            "idle": round(idle_memory, 1) if idle_memory else None,
            "peak": round(max(memory), 1),
            "end": round(memory[-1], 1),
        },
        "operator_requests": dict(sorted(requests.items())),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--stage-seconds", type=float, default=5.0, help="simulated time of every stage")
    parser.add_argument("--jitter", type=float, default=5.0, help="plus up to this much, at random")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "operator_bench.json"))
    parser.add_argument("--keep-log", help="copy the operator's log here")
    parser.add_argument("--profile", help="run the operator under cProfile, writing its stats here")
    parser.add_argument("--verbose", action="store_true", help="the operator logs at debug level")
    parser.add_argument("--cluster", action="store_true",
                        help="against the real control plane with kwok nodes (bench/operator_cluster_bench.py)")
    import operator_cluster_bench

    operator_cluster_bench.add_arguments(parser)
    args = parser.parse_args()
    random.seed(args.seed)
    if args.cluster:
        if args.out == parser.get_default("out"):
            args.out = str(ROOT / "bench" / "results" / "operator_bench_cluster.json")
        result = operator_cluster_bench.bench(args)
    else:
        result = asyncio.run(bench(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
