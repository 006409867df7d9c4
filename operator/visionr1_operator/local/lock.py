"""One run directory, one executor: an exclusive ``flock`` on ``<run dir>/executor.lock``.

The holder writes who it is into the file (pid, host, start time, and the stage it runs
with that stage's pid), so a second ``visionr1 run`` on the same directory can say who
holds it. The stage process inherits the locked file, so a stage left running by an
executor that was killed outright (SIGKILL) still holds the directory: a new executor
waits for it to stop (it was told to, see ``executor.launch``) rather than start the
same stage beside it. The kernel releases the lock when the last holder exits, however
it exits; the file itself stays (removing it would let two executors lock two files).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

LOCK_FILE = "executor.lock"
# How long a new executor waits for stage processes left by a dead one to stop.
ORPHAN_WAIT_S = 300.0


class RunLocked(Exception):
    """Another executor (or a stage it left running) holds the run directory."""


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict, path: Path) -> str:
    if not holder.get("pid"):
        return f"another process holds {path} (it wrote no details)"
    who = f"visionr1 run (pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('startedAt', '?')})"
    if holder.get("stage"):
        who += f", running stage {holder['stage']} as pid {holder.get('stagePid', '?')}"
    return who


@dataclass
class RunLock:
    path: Path
    fd: int
    info: dict

    def update(self, **fields) -> None:
        """Rewrite the holder details (the stage being run), in place."""
        self.info.update(fields)
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the lock goes with the last descriptor, ours or a stage's
            self.fd = -1


def acquire(directory: Path, on_wait: Callable[[str], None] = lambda _: None,
            cancelled: Callable[[], bool] = lambda: False, orphan_wait_s: float = ORPHAN_WAIT_S) -> RunLock:
    """Lock ``directory`` for this process or raise RunLocked naming who holds it.

    A live holder means another executor runs: refused at once. A holder whose executor
    is gone (killed outright) can only be a stage process it started, which was told to
    stop when its parent died: we wait up to ``orphan_wait_s`` for it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline, told = None, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunLocked(f"{path}: cannot lock the run directory: {exc}") from exc
        holder = read_holder(path)
        here = holder.get("host") == socket.gethostname()
        if not here or _alive(holder.get("pid")) or not holder:
            os.close(fd)
            raise RunLocked(f"run directory {directory} is in use by {describe(holder, path)}; "
                            "stop that run first, or give this one another storage (--storage)")
        deadline = deadline or time.monotonic() + orphan_wait_s
        if not told:
            on_wait(f"the executor that held {directory} (pid {holder.get('pid')}) has exited, but a stage it "
                    f"started (pid {holder.get('stagePid', '?')}) still runs; it was told to stop: waiting "
                    f"up to {orphan_wait_s:.0f} s for it")
            told = True
        if cancelled():
            os.close(fd)
            raise RunLocked(f"stopped while waiting for the lock on {directory}")
        if time.monotonic() > deadline:
            os.close(fd)
            raise RunLocked(f"run directory {directory} is still held by a stage process left by "
                            f"{describe(holder, path)}; stop it (kill {holder.get('stagePid', '<pid>')}) and run again")
        time.sleep(0.2)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "startedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    lock = RunLock(path, fd, info)
    lock.update()
    return lock
