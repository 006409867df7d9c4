"""`python -m visionr1_trainer.launch <stage> --config stage.json -- torchrun ...`: check the
stage config, then run the launcher (torchrun) and carry a worker's exit 2 through it.

torchrun turns a worker's exit status into its own 1, so a worker's "2, the config is
unusable" reached the operator as an ordinary failure, retried ``backoffLimit`` times on
the stage's full GPU allocation. The operator's multi-GPU pods run this first:

1. The config is validated once, by the same pydantic model the stage uses, before any
   worker starts; an unusable one exits 2 with the reason in the termination message
   (what ``python -m visionr1_trainer`` does for one process), which the Job's
   podFailurePolicy fails at once.
2. A valid one runs the command as a child with ``VISIONR1_UNUSABLE_FILE`` set: a worker
   that finds a setting it cannot run only once it starts (a reward plug-in that does not
   import, batch sizes that do not split over the ranks, LoRA modules that match nothing)
   exits 2 and leaves its reason there (``runtime.note_unusable``). When the command
   fails and a reason is there, this exits 2 with it in the termination message.
   Otherwise the command's own exit status is the pod's (128 + N for a signal N), and
   SIGTERM, SIGINT and SIGHUP are passed on to it (torchrun passes them to the workers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import STAGE_KINDS, ConfigError, load_stage_config
from .redact import redact
from .runtime import EXIT_BAD_CONFIG, UNUSABLE_FILE_ENV, termination_path_of, write_termination_message

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m visionr1_trainer.launch <stage> --config FILE -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m visionr1_trainer.launch", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGE_KINDS, help="which stage the command runs")
    parser.add_argument("--config", required=True, help="the stage config JSON file")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")
    return args, command


def check(stage: str, config_file: str) -> str | None:
    """Why the config cannot be used (None when it can)."""
    try:
        load_stage_config(config_file, expected_kind=stage)
    except ConfigError as exc:
        return f"bad config: {exc}"
    if importlib.util.find_spec(f"visionr1_trainer.{stage}") is None:
        return f"the {stage} stage is not available in this installation"
    return None


def refuse(stage: str, config_file: str, problem: str) -> int:
    """Exit 2 with the reason on stderr and in the termination message (a worker's summary,
    if one wrote it, keeps its other keys)."""
    print(f"error: {redact(problem)}", file=sys.stderr)
    path = termination_path_of(config_file)
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        earlier = {}
    summary = {**(earlier if isinstance(earlier, dict) else {}), "stage": stage, "error": problem[:1000]}
    write_termination_message(path, summary)
    return EXIT_BAD_CONFIG


def run_command(command: list[str], unusable: Path) -> int:
    """Run the command to its end with the signals passed on; its exit status, 128 + N for signal N."""
    try:
        child = subprocess.Popen(command, env={**os.environ, UNUSABLE_FILE_ENV: str(unusable)})
    except OSError as exc:
        print(f"error: cannot start {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in FORWARDED}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = check(args.stage, args.config)
    if problem is not None:
        return refuse(args.stage, args.config, problem)
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="visionr1-launch-") as scratch:
        unusable = Path(scratch) / "unusable"
        status = run_command(command, unusable)
        if status != 0 and unusable.exists():
            return refuse(args.stage, args.config, unusable.read_text(encoding="utf-8", errors="replace"))
    return status


if __name__ == "__main__":
    sys.exit(main())
