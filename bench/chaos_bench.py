"""Chaos on the real control plane at the issue's size (issue 14, "Chaos, with nothing lost").

    nice -n 10 .venv/bin/python bench/chaos_bench.py          # 50 runs, 20 kills, 2 + 1 restarts

Starts its own test control plane (tests/cluster/), then tests/cluster/chaos.py: 50 runs
of three stages (SFT, PTST 1, eval; each pod ends 1-6 s after it starts), the operator
SIGKILLed 20 times at random moments and started again, the API server restarted twice
and etcd once (each keeps its data directory and port), spread over ``--horizon``
seconds. Every run must end Succeeded; no Job created twice (by name, or a second UID);
no stage started again after it succeeded; no status record lost (watched throughout).
Writes ``bench/results/chaos_bench.json``; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from chaos import run_chaos  # noqa: E402
from controlplane import ControlPlane  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--apiserver-restarts", type=int, default=2)
    parser.add_argument("--etcd-restarts", type=int, default=1)
    parser.add_argument("--horizon", type=float, default=120.0, help="seconds over which the chaos is spread")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=16)
    parser.add_argument("--keep-dir", help="keep the control plane's and the operator's logs here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos_bench.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as tmp:
        work = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        plane = ControlPlane(work / "cluster", nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                             controller_qps=100, log=lambda line: print(line, file=sys.stderr))
        plane.start(timeout=300)
        try:
            result = run_chaos(plane, work / "chaos", runs=args.runs, kills=args.kills,
                               apiserver_restarts=args.apiserver_restarts, etcd_restarts=args.etcd_restarts,
                               horizon=args.horizon, seed=args.seed, timeout=args.timeout,
                               log=lambda line: print(line, file=sys.stderr))
        finally:
            plane.stop()
    summary = result.summary() | {"seed": args.seed, "horizon_seconds": args.horizon, "cpus": os.cpu_count(),
                                  "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if result.succeeded == args.runs and not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
