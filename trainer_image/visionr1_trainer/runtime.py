"""What every stage process shares: stop requests, the exit summary, logging.

Kubernetes stops a pod with SIGTERM and gives it ``terminationGracePeriodSeconds``;
Ctrl-C sends SIGINT locally. Both only *request* a stop: training loops poll
``stop_requested()`` at step boundaries, commit a checkpoint and exit, so a preempted
stage loses at most the step in flight. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_STOPPED = 0, 1, 2, 143

_stop = threading.Event()

# Set by the multi-process launcher (``visionr1_trainer.launch``) for its workers: torchrun
# reports any worker's failure as its own exit 1, so a worker that exits 2 (the config is
# unusable) also leaves its reason here, and the launcher exits 2 with it.
UNUSABLE_FILE_ENV = "VISIONR1_UNUSABLE_FILE"


class UnusableSetting(Exception):
    """A setting this machine cannot run (DeepSpeed missing for a ZeRO stage...): exit 2.

    The message names the field. A stage never swaps a setting for another silently.
    """


class StageStopped(Exception):
    """Raised by a stage that stopped early on request, after committing its progress."""


def stop_requested() -> bool:
    return _stop.is_set()


def request_stop() -> None:
    _stop.set()


def reset_stop() -> None:
    _stop.clear()


def install_signal_handlers() -> None:
    """SIGTERM / first SIGINT: request a graceful stop; second SIGINT: stop now."""

    def on_signal(signum, frame):
        if signum == signal.SIGINT and _stop.is_set():
            raise KeyboardInterrupt
        logging.getLogger("visionr1").warning(
            "%s received: finishing the current step, committing a checkpoint, then exiting",
            signal.Signals(signum).name,
        )
        _stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def note_unusable(reason: str) -> None:
    """Tell the launcher (if one started this worker) that the stage exits 2, and why.

    The first worker to say so wins; the others' reasons are the same setting's."""
    path = os.environ.get(UNUSABLE_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "x", encoding="utf-8") as out:
            out.write(reason[:1000])
    except FileExistsError:
        pass
    except OSError as exc:
        logging.getLogger("visionr1").warning("cannot tell the launcher the config is unusable (%s): %s", path, exc)


def compact_summary(summary: dict[str, Any], limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """JSON of ``summary`` within ``limit`` bytes: long fields are dropped, largest first."""
    data = dict(summary)
    text = json.dumps(data, separators=(",", ":"), default=str)
    while len(text.encode()) > limit and data:
        largest = max(data, key=lambda k: len(json.dumps(data[k], default=str)))
        data.pop(largest)
        data["truncated"] = True
        text = json.dumps(data, separators=(",", ":"), default=str)
    return text


def write_termination_message(path: str | Path, summary: dict[str, Any]) -> bool:
    """Write the summary where the kubelet (or the local executor) reads it; never raises.

    Redacted on the way out: the operator copies it into the run's status and Events.
    """
    from .redact import redact_value

    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(compact_summary(redact_value(summary)))
        return True
    except OSError as exc:
        logging.getLogger("visionr1").warning("cannot write the termination message to %s: %s", path, exc)
        return False


def termination_path_of(config_file: str | Path) -> str:
    """Where a stage whose config failed to validate writes its summary: the file's own
    ``terminationMessagePath`` if it can be read, else the Kubernetes default."""
    try:
        value = json.loads(Path(config_file).read_text()).get("terminationMessagePath")
    except (OSError, ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) and value else "/dev/termination-log"


def work_dir(config) -> Path:
    """A stage's scratch space: VISIONR1_WORK_DIR, else ``_work`` beside a local output, else /tmp.

    ``config`` is any stage config (``run``, ``stage``, ``output_uri``). Locally the work
    dir (metrics log included) sits beside the stage's artifacts, where the executor and
    ``visionr1 report`` read it; in a pod it is the pod's own disk.
    """
    if os.environ.get("VISIONR1_WORK_DIR"):
        return Path(os.environ["VISIONR1_WORK_DIR"])
    if config.output_uri.startswith("file://"):
        return Path(config.output_uri[len("file://"):]) / "_work"
    return Path("/tmp/visionr1") / config.run / config.stage


class RedactingFormatter(logging.Formatter):
    """Every log line (tracebacks included) through ``redact``: the cluster keeps pod logs."""

    def format(self, record: logging.LogRecord) -> str:
        from .redact import redact

        return redact(super().format(record))


def setup_logging(stage: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{stage}] %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)s [{stage}] %(name)s: %(message)s"))
