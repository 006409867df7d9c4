"""Chaos on the real control plane: the operator killed, the API server and etcd restarted.

``run_chaos`` creates ``runs`` tiny runs (SFT, one PTST stage, eval; every pod ends with
exit 0 a few seconds after it starts), then, at random moments over ``horizon`` seconds,
SIGKILLs the operator ``kills`` times (it is started again at once, as a Deployment's
pod would be), restarts the API server ``apiserver_restarts`` times and etcd
``etcd_restarts`` times (each keeps its data directory and port). Two watches, on the
runs and on the Jobs, record what the API server said throughout. ``check`` then asks:

- did every run end Succeeded, with every stage Succeeded on its first attempt;
- was any Job created twice (a second ADDED for a name, or a second UID for a name);
- did any stage start again after it had succeeded (a Job of it created later);
- was any status record lost: did a stage's record, once Succeeded, ever show less, its
  attempts go down, its completion time change, or a Succeeded stage vanish.

Used by tests/test_cluster_chaos.py (small) and bench/chaos_bench.py (the issue's sizes).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwok_stages import exit_stage
from watch import Event, Watch

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("sft", "ptst-1", "eval")
_JOB = re.compile(r"^(?P<run>.+)-(?P<stage>sft|ptst-\d+|eval)-(?P<attempt>\d+)$")


def tiny_run(name: str, namespace: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from operator_harness import run_manifest

    doc = run_manifest(name, namespace)
    spec = doc["spec"]
    spec["data"]["coldStart"] = {"source": "s3://vr1/cold-start"}
    spec["stages"]["bridge"] = {"enabled": False}
    spec["stages"]["ptst"] = spec["stages"]["ptst"][:1]
    return doc


@dataclass
class Operator:
    """The operator as a process that can be SIGKILLed and started again."""

    kubeconfig: Path
    log: Path
    namespace: str
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        from controlplane import free_port

        cmd = [sys.executable, "-m", "visionr1_operator", "--standalone", f"--kubeconfig={self.kubeconfig}",
               "--namespace", self.namespace, "--metrics-port=0", f"--health-port={free_port()}",
               "--retry-base=1", "--retry-max=2", "--progress-interval=3600"]
        sink = self.log.open("a")
        sink.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n")
        sink.flush()
        self.process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                        env={**os.environ, "POD_ID": f"chaos-{self.starts}"}, cwd=ROOT)
        sink.close()
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class ChaosResult:
    runs: int
    wall_seconds: float
    actions: list[tuple[float, str]]  # (seconds after the runs were created, what)
    succeeded: int
    problems: list[str] = field(default_factory=list)
    jobs_created: int = 0
    operator_starts: int = 0
    watch_reconnects: int = 0
    watch_relists: int = 0
    run_events: int = 0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "problems"} | {
            "problems": self.problems[:50], "problem_count": len(self.problems)}


def _schedule(rng: random.Random, horizon: float, kills: int, apiservers: int, etcds: int) -> list[tuple[float, str]]:
    plan = [(rng.uniform(1.0, horizon), "kill operator") for _ in range(kills)]
    plan += [(rng.uniform(0.15 * horizon, horizon), "restart kube-apiserver") for _ in range(apiservers)]
    plan += [(rng.uniform(0.15 * horizon, horizon), "restart etcd") for _ in range(etcds)]
    return sorted(plan)


def run_chaos(plane, work: Path, *, runs: int, kills: int, apiserver_restarts: int, etcd_restarts: int,
              horizon: float, seed: int = 0, timeout: float = 900.0, namespace: str = "chaos",
              stage_seconds: tuple[float, float] = (1.0, 6.0), log=print) -> ChaosResult:
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    plane.wait_established("visionr1runs.visionr1.io")
    plane.kubectl_apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n")
    while plane.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode != 0:
        time.sleep(0.3)
    plane.kubectl_apply(exit_stage(f"{namespace}-pods", {}, exit_code=0, after_seconds=stage_seconds[0],
                                   up_to_seconds=stage_seconds[1], namespace=namespace))
    operator = Operator(plane.kubeconfig, work / "operator.log", namespace)
    jobs = Watch(plane, f"/apis/batch/v1/namespaces/{namespace}/jobs", keep_objects=False)
    runs_watch = Watch(plane, f"/apis/visionr1.io/v1alpha1/namespaces/{namespace}/visionr1runs", keep_objects=False)
    names = [f"c{i:03d}" for i in range(runs)]
    actions: list[tuple[float, str]] = []
    with jobs, runs_watch:
        operator.start()
        listing = {"apiVersion": "v1", "kind": "List", "items": [tiny_run(n, namespace) for n in names]}
        plane.kubectl("create", "-f", "-", input=json.dumps(listing))
        t0 = time.monotonic()
        for at, what in _schedule(rng, horizon, kills, apiserver_restarts, etcd_restarts):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            actions.append((round(time.monotonic() - t0, 1), what))
            log(f"[chaos] {actions[-1][0]:6.1f} s  {what}")
            if what == "kill operator":
                operator.kill()
                time.sleep(rng.uniform(0.0, 1.5))
                operator.start()
            else:
                plane.restart(what.split()[-1], down_seconds=rng.uniform(1.0, 3.0))
            plane.check_alive()
        deadline = t0 + timeout
        while _succeeded(runs_watch, names) < runs and time.monotonic() < deadline:
            plane.check_alive()
            if operator.process.poll() is not None:
                log(f"[chaos] the operator exited by itself ({operator.process.returncode}); starting it again")
                operator.start()
            time.sleep(1.0)
        wall = time.monotonic() - t0
        time.sleep(3.0)  # late writes, if any, would show in the record
        operator.stop()
    result = ChaosResult(runs=runs, wall_seconds=round(wall, 1), actions=actions,
                         succeeded=_succeeded(runs_watch, names), operator_starts=operator.starts,
                         watch_reconnects=jobs.reconnects + runs_watch.reconnects,
                         watch_relists=jobs.relists + runs_watch.relists, run_events=len(runs_watch.events))
    result.jobs_created = len({e.name for e in jobs.events if e.type in ("ADDED", "LISTED")})
    result.problems = check(names, jobs.snapshot(), runs_watch.snapshot())
    final = json.loads(plane.kubectl("get", "vr1", "-n", namespace, "-o", "json").stdout)["items"]
    result.problems += check_final(names, final)
    return result


def _succeeded(watch: Watch, names: list[str]) -> int:
    phase: dict[str, str] = {}
    for event in watch.snapshot():
        phase[event.name] = ((event.obj.get("status") or {}).get("phase")) or ""
    return sum(phase.get(n) == "Succeeded" for n in names)


def check(names: list[str], job_events: list[Event], run_events: list[Event]) -> list[str]:
    problems: list[str] = []
    uids: dict[str, set[str]] = defaultdict(set)
    added: dict[str, int] = defaultdict(int)
    first_seen: dict[str, float] = {}
    for event in job_events:
        uids[event.name].add(event.uid)
        first_seen.setdefault(event.name, event.t)
        if event.type == "ADDED":
            added[event.name] += 1
    for name, found in sorted(uids.items()):
        if len(found) > 1:
            problems.append(f"Job {name} existed with {len(found)} UIDs (created twice)")
        if added[name] > 1:
            problems.append(f"Job {name} was ADDED {added[name]} times")
        match = _JOB.match(name)
        if match and match["attempt"] != "1":
            problems.append(f"Job {name}: an attempt past the first (no pod ever failed)")
    # A stage's record, once Succeeded, stays so; attempts never go down; nothing vanishes.
    succeeded_at: dict[tuple[str, str], float] = {}
    last: dict[tuple[str, str], dict] = {}
    for event in run_events:
        if event.type == "DELETED":
            continue
        records = {r.get("name"): r for r in (event.obj.get("status") or {}).get("stages") or []}
        for (run, stage), before in list(last.items()):
            if run != event.name:
                continue
            now = records.get(stage)
            if now is None:
                problems.append(f"run {run}: stage {stage}'s record vanished (event at {event.t:.1f})")
                continue
            if before.get("state") == "Succeeded" and now.get("state") != "Succeeded":
                problems.append(f"run {run}: stage {stage} went from Succeeded to {now.get('state')}")
            if (now.get("attempts") or 0) < (before.get("attempts") or 0):
                problems.append(f"run {run}: stage {stage}'s attempts went from {before.get('attempts')} "
                                f"to {now.get('attempts')}")
            if before.get("completionTime") and now.get("completionTime") != before.get("completionTime"):
                problems.append(f"run {run}: stage {stage}'s completionTime changed")
        for stage, record in records.items():
            last[(event.name, stage)] = record
            if record.get("state") == "Succeeded":
                succeeded_at.setdefault((event.name, stage), event.t)
    for name, t in first_seen.items():
        match = _JOB.match(name)
        if match and (match["run"], match["stage"]) in succeeded_at and t > succeeded_at[(match["run"], match["stage"])]:
            problems.append(f"Job {name} was created after its stage had succeeded")
    for run in names:
        for stage in STAGES:
            if f"{run}-{stage}-1" not in uids:
                problems.append(f"run {run}: no Job for stage {stage} was ever seen")
    return problems


def check_final(names: list[str], items: list[dict]) -> list[str]:
    problems: list[str] = []
    by_name = {i["metadata"]["name"]: i for i in items}
    for run in names:
        status = (by_name.get(run) or {}).get("status") or {}
        if status.get("phase") != "Succeeded":
            problems.append(f"run {run} ended {status.get('phase')!r}, not Succeeded")
            continue
        records = [(r["name"], r["state"], r.get("attempts"), r.get("failures", 0), bool(r.get("completionTime")),
                    r.get("jobName")) for r in status.get("stages") or []]
        wanted = [(s, "Succeeded", 1, 0, True, f"{run}-{s}-1") for s in STAGES]
        if records != wanted:
            problems.append(f"run {run}: stage records {records}, wanted {wanted}")
    return problems
