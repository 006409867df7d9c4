"""`python -m visionr1_trainer <stage> --config stage.json`: run one pipeline stage.

The stage config is the JSON the operator puts in a ConfigMap (or the local executor in
a file), validated by the same pydantic model. At exit the stage's compact summary
(last step, key metrics, committed artifact URI) goes to the termination-message file,
where the operator reads it from the Pod's status.

Exit status: 0 done, 1 the stage failed, 2 the config is unusable (retrying cannot
help), 143 stopped on request (SIGTERM/SIGINT) after committing progress.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from .config import STAGE_KINDS, ConfigError, load_stage_config
from .runtime import (
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    StageStopped,
    UnusableSetting,
    install_signal_handlers,
    note_unusable,
    setup_logging,
    termination_path_of,
    write_termination_message,
)
from .redact import redact

log = logging.getLogger("visionr1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m visionr1_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGE_KINDS, help="which stage to run")
    parser.add_argument("--config", required=True, help="the stage config JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.stage)
    try:
        config = load_stage_config(args.config, expected_kind=args.stage)
    except ConfigError as exc:
        # The status must say why in the trainer's words, not only "exit code 2".
        print(f"error: {redact(exc)}", file=sys.stderr)
        write_termination_message(termination_path_of(args.config),
                                  {"stage": args.stage, "error": f"bad config: {exc}"[:1000]})
        note_unusable(f"bad config: {exc}")
        return EXIT_BAD_CONFIG
    try:
        stage = importlib.import_module(f"visionr1_trainer.{args.stage}")
    except ModuleNotFoundError as exc:
        message = f"the {args.stage} stage is not available in this installation ({exc})"
        print(f"error: {message}", file=sys.stderr)
        write_termination_message(config.termination_message_path,
                                  {"stage": config.stage, "attempt": config.attempt, "error": message})
        note_unusable(message)
        return EXIT_BAD_CONFIG
    install_signal_handlers()
    status, summary = EXIT_OK, {}
    try:
        summary = stage.run(config) or {}
    except StageStopped as exc:
        status, summary = EXIT_STOPPED, {"stopped": True, **(exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {})}
        log.warning("stopped on request; progress up to the last checkpoint is committed")
    except KeyboardInterrupt:
        status, summary = EXIT_STOPPED, {"stopped": True}
    except UnusableSetting as exc:  # retrying cannot help: the config asks for what cannot run here
        print(f"error: {redact(exc)}", file=sys.stderr)
        partial = getattr(exc, "summary", None)
        status, summary = EXIT_BAD_CONFIG, {**(partial if isinstance(partial, dict) else {}),
                                            "error": str(exc)[:1000]}
    except Exception as exc:  # the stage failed: say why, in the log and in the summary
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        # A stage that did part of its work (the eval stage's other benchmarks) says so too.
        partial = getattr(exc, "summary", None)
        status, summary = EXIT_FAILED, {**(partial if isinstance(partial, dict) else {}),
                                        "error": f"{type(exc).__name__}: {exc}"[:1000]}
    summary = {"stage": config.stage, "attempt": config.attempt, **summary}
    write_termination_message(config.termination_message_path, summary)
    if status == EXIT_BAD_CONFIG:
        note_unusable(summary["error"])
    return status


if __name__ == "__main__":
    sys.exit(main())
