"""`python -m visionr1_trainer.launch <stage> --config stage.json -- torchrun ...`: check the
stage config, then become the launcher (torchrun).

torchrun turns a worker's exit status into its own 1, so a worker's "2, the config is
unusable" reached the operator as an ordinary failure, retried ``backoffLimit`` times on
the stage's full GPU allocation. The operator's multi-GPU pods run this first: the
config is validated once, by the same pydantic model the stage uses, before any worker
starts; an unusable one exits 2 with the reason in the termination message (what
``python -m visionr1_trainer`` does for one process), which the Job's podFailurePolicy
fails at once. A valid one ``exec``s the command unchanged (same PID, signals, exit status).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .config import STAGE_KINDS, ConfigError, load_stage_config
from .redact import redact
from .runtime import EXIT_BAD_CONFIG, termination_path_of, write_termination_message


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


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = check(args.stage, args.config)
    if problem is not None:
        print(f"error: {redact(problem)}", file=sys.stderr)
        write_termination_message(termination_path_of(args.config), {"stage": args.stage, "error": problem[:1000]})
        return EXIT_BAD_CONFIG
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
