"""Rewards as plug-ins: ``grpo.reward`` / ``grpo.extraRewards`` name ``module:function``.

A plug-in is any function importable in the trainer image with this signature (verl's
``compute_score``, one completion at a time)::

    def my_reward(completion: str, answer: str, problem: str) -> float: ...

``completion`` is the decoded completion (format tags kept, special tokens dropped),
``answer`` the RL row's ground truth, ``problem`` its question text. The step's reward is
``reward(...) + sum(weight * function(...) for each of extraRewards)``; ``hfrrf`` names
the Hard Format Result Reward (grpo/reward.py) anywhere a function can be named.

A plug-in runs in its own process (one per function, started at stage start and reused):
a plug-in that hangs or leaks cannot stop or slow the training step beyond its bound.
Each call gets ``rewardTimeoutSeconds`` (SIGALRM inside the worker, which stops Python
code); the trainer waits at most that per completion plus a second and otherwise kills
the worker (the rest of the batch scores 0, timed out) and starts a new one for the next
step. A call that raises, returns a non-number or a non-finite number scores 0. Nothing a
plug-in does crashes a step: errors and timeouts are counted in the step's metrics
(``reward_plugin_errors``, ``reward_plugin_timeouts``). A name that does not import is
refused at stage start (exit 2, naming the field).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime import UnusableSetting

_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from visionr1_trainer.grpo.reward_plugins import _serve; _serve({name!r}, {timeout!r})")
STARTUP_TIMEOUT_S = 60.0


@dataclass
class PluginScores:
    values: list[float]  # one per completion; 0 for errors and timeouts
    errors: int
    timeouts: int


def resolve(name: str) -> Callable[[str, str, str], float]:
    """The function ``module:function`` names (raises ImportError/AttributeError/TypeError)."""
    module, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"{name} is not callable")
    return fn


def _score_one(fn, completion: str, answer: str, problem: str) -> float:
    value = float(fn(completion, answer, problem))
    if not math.isfinite(value):
        raise ValueError(f"non-finite reward {value}")
    return value


class PluginWorker:
    """One plug-in's process: a JSON batch in, one ``[value | null, timed_out]`` per item out."""

    def __init__(self, name: str, field: str, timeout_s: float) -> None:
        self.name, self.field, self.timeout_s = name, field, timeout_s
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the worker; a function that does not import is an unusable setting (exit 2)."""
        root = str(Path(__file__).resolve().parents[2])
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT.format(root=root, name=self.name, timeout=self.timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        line = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        reply = json.loads(line) if line else {"error": "no reply within the start-up time"}
        if reply.get("ready") is not True:
            self.close()
            raise UnusableSetting(f"{self.field}: cannot use reward function {self.name!r}: {reply.get('error')}")

    def score(self, completions: list[str], answers: list[str], problems: list[str]) -> PluginScores:
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        job = json.dumps({"items": list(zip(completions, answers, problems))}).encode() + b"\n"
        deadline = time.monotonic() + self.timeout_s * len(completions) + 1.0
        try:
            self._proc.stdin.write(job)
            line = self._read_line(deadline)
        except OSError:
            line = None
        if line is None:  # hung beyond every per-call alarm (C code), or died: start afresh next time
            self.close()
            return PluginScores([0.0] * len(completions), 0, len(completions))
        results = json.loads(line)
        values = [0.0 if v is None else v for v, _ in results]
        timeouts = sum(1 for _, slow in results if slow)
        errors = sum(1 for v, slow in results if v is None and not slow)
        return PluginScores(values, errors, timeouts)

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = b""
        while b"\n" not in pending:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            pending += chunk
        return pending.partition(b"\n")[0]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            self._proc = None


def _serve(name: str, timeout_s: float) -> None:
    """A plug-in worker's main loop (its own process, so SIGALRM bounds each call)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a print() in the plug-in must not corrupt the replies
    try:
        fn = resolve(name)
    except Exception as exc:  # noqa: BLE001 - reported to the trainer, which exits 2
        replies.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        return
    replies.write(b'{"ready": true}\n')

    class _Overran(Exception):
        pass

    def alarm(*_):
        raise _Overran

    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin.buffer:
        out = []
        for completion, answer, problem in json.loads(line)["items"]:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                out.append([_score_one(fn, completion, answer, problem), False])
            except _Overran:
                out.append([None, True])
            except BaseException:  # noqa: BLE001 - any failure of a plug-in scores 0
                out.append([None, False])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        replies.write(json.dumps(out).encode() + b"\n")


class RewardScorer:
    """The step's reward: ``reward`` plus the weighted ``extraRewards``, built once per stage.

    ``hfrrf`` terms reuse the HFRRF results the step computes anyway (for its accuracy
    and format metrics); every other name runs in its own ``PluginWorker``.
    """

    def __init__(self, terms: list[tuple[str, float, str]], timeout_s: float) -> None:
        """``terms``: (function name, weight, the setting that names it)."""
        self.terms = terms
        self.workers: dict[str, PluginWorker] = {}
        for name, _, field in self.terms:
            if name != "hfrrf" and name not in self.workers:
                self.workers[name] = PluginWorker(name, field, timeout_s)

    @classmethod
    def from_settings(cls, grpo) -> RewardScorer:
        """From ``GRPOSettings``: ``reward`` (weight 1) and each of ``extraRewards``."""
        terms = [(grpo.reward, 1.0, "grpo.reward")] + [
            (t.function, t.weight, f"grpo.extraRewards[{i}].function") for i, t in enumerate(grpo.extra_rewards)
        ]
        return cls(terms, grpo.reward_timeout_seconds)

    def start(self) -> RewardScorer:
        for worker in self.workers.values():
            worker.start()
        return self

    def __call__(self, hfrrf: list, completions: list[str], answers: list[str], problems: list[str]):
        """``(B,)`` float32 rewards and the plug-ins' error/timeout counts (empty for hfrrf alone)."""
        import torch

        base = torch.tensor([r.reward for r in hfrrf], dtype=torch.float32)
        if not self.workers:
            return base, {}
        scores = {name: w.score(completions, answers, problems) for name, w in self.workers.items()}
        total = torch.zeros_like(base)
        for name, weight, _ in self.terms:
            values = base if name == "hfrrf" else torch.tensor(scores[name].values, dtype=torch.float32)
            total += weight * values
        stats = {"reward_plugin_errors": float(sum(s.errors for s in scores.values())),
                 "reward_plugin_timeouts": float(sum(s.timeouts for s in scores.values()))}
        return total, stats

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
