"""The Hard Format Result Reward Function (HFRRF) of Vision-R1 (arXiv 2503.06749, Sec. PTST).

The reward is 1.0 only when a completion has the trained format *and* the right answer,
else 0.0 (no partial credit for either):

* Format: exactly one ``<think>...</think>`` block followed by exactly one
  ``<answer>...</answer>`` block, with only whitespace before, between and after them, and
  no other ``<think>``/``<answer>`` tag anywhere (in any case, opening or closing). An empty
  ``<think></think>`` still has the format: PTST constrains reasoning length from above
  through the generation budget; the reward does not ask for a minimum.
* Answer: inside ``<answer>``, the text after the last ``Final Answer:`` (any case), else
  the whole content; of that, the last ``\\boxed{...}`` if there is one
  (``visionr1_trainer.answers.extract_final_answer``). Both sides are tidied
  (``normalize_answer``: ``$``, trailing period, a wrapping ``\\boxed``/``\\text``) and
  then compared by the first rule that applies:

  1. the ground truth is a choice letter ``A``-``E`` (``B``, ``(b)``, ``B.``): the answer
     must be the same letter in any of those forms, compared as letters only;
  2. the ground truth is a plain word or phrase (``red``, ``Yes``): same text, ignoring
     case and runs of spaces (math-verify would read ``red`` as the product ``r*e*d``, equal
     to ``der``);
  3. equal strings;
  4. otherwise math-verify (``verify(parse(gold), parse(answer))``, each side wrapped in
     ``$...$`` unless it holds a ``$``). What it accepts is what counts: ``\\frac{1}{2}`` =
     ``0.5`` = ``1/2``, ``3\\sqrt{2}`` = ``\\sqrt{18}``, ``2.50`` = ``2.5``, ``-3`` = ``−3``,
     units and degrees dropped (``5 cm`` = ``5``, ``30^\\circ`` = ``30``), and a percentage
     equal to both readings (``50\\%`` = ``50`` and ``50\\%`` = ``0.5``).

  ``answer_ok`` is judged on the last ``<answer>`` block even when the format is wrong, so
  the metrics can tell format failures from wrong answers; the reward needs both.

Bounding time. Rewards are computed on model output, which can be anything: a megabyte of
text, 500 nested boxes, ``10^{10^{10^{10}}}``. math-verify bounds its own time with
SIGALRM, which works only on a process's main thread (the rewards run in the trainer's
threads), would replace any other SIGALRM handler of the trainer (pytest-timeout's, say),
and cannot stop one long C call (a signal handler runs between bytecodes only, so a single
huge integer power runs to its end). So the work is split:

* In the caller's thread, only linear-time string work: the format check, extraction,
  normalisation, rules 1-3 above, and a pre-filter that refuses (answer wrong, not timed
  out) answers longer than ``MAX_ANSWER_CHARS`` and power towers / huge literal exponents
  (``9^{9^{9}}``, ``9**9**9``, ``2^{10000000}``), which no real answer needs.
* Rule 4 runs in a small pool of verifier processes (at most ``MAX_PROCESSES``, started
  on first use, reused, each a fresh ``python -c`` that imports only this module and
  math-verify). Inside the worker, math-verify's own SIGALRM timeouts work (it is that
  process's main thread) and stop most slow cases without losing the worker; the caller
  waits at most ``VERIFY_TIMEOUT_S`` for the reply and otherwise kills the worker
  (``timed_out=True``, answer wrong); the next call starts a new one. A worker also
  caps its own CPU time (``RLIMIT_CPU``) in case its parent dies mid-job.

Why these processes: a thread cannot be stopped; a ``ProcessPoolExecutor`` cannot kill a
task that overruns; ``fork`` of a trainer with CUDA and many threads is unsafe, while a
``subprocess`` is exec'd at once and needs nothing pickled. Each worker remembers its
verdicts (a GRPO group repeats its answers). Measured on 2 CPU cores: a worker starts in
about 0.5 s (sympy's import), once per worker; a fresh comparison takes 1-10 ms of sympy,
a remembered one a 0.06 ms round trip; 512 completions with 54 distinct (truth, answer)
pairs score in 0.5 s on one cold worker, 0.06 s warm. A call from any thread takes at most
``VERIFY_TIMEOUT_S`` for the comparison, plus a worker's start when none is idle (0.5 s;
given up after ``STARTUP_TIMEOUT_S``), plus, only when more than ``MAX_PROCESSES`` calls
overlap, up to ``VERIFY_TIMEOUT_S`` waiting for a worker.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..answers import choice_letter, extract_final_answer, normalize_answer

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_PROCESSES",
    "VERIFY_TIMEOUT_S",
    "RewardResult",
    "answer_block",
    "answers_match",
    "batch_rewards",
    "check_format",
    "hard_format_result_reward",
    "score_completion",
]

log = logging.getLogger(__name__)

# Longest extracted answer (or ground truth) that is compared at all; real answers are
# under a hundred characters, and sympy's cost grows fast with length.
MAX_ANSWER_CHARS = 1000
# The caller's hard limit for one math-verify comparison, worker round trip included.
VERIFY_TIMEOUT_S = 2.0
# A worker's cold start (imports sympy, ~0.5 s measured); paid once per worker.
STARTUP_TIMEOUT_S = 10.0
# Verifier processes alive at once; more concurrent callers wait (up to VERIFY_TIMEOUT_S).
MAX_PROCESSES = 8
# math-verify's own SIGALRM timeouts inside a worker (whole seconds: signal.alarm).
_WORKER_ALARM_S = 1
# A worker's CPU-seconds per job before the kernel stops it (only matters if orphaned).
_WORKER_CPU_LIMIT_S = 30
# Verdicts a worker remembers (then forgets all at once; entries are a few hundred bytes).
_WORKER_CACHE_SIZE = 8192

_LAYOUT = ("<think>", "</think>", "<answer>", "</answer>")
# Any think/answer tag, in any case. One `\s*` only: no backtracking over long whitespace.
_TAG = re.compile(r"</?(?:think|answer)\s*>", re.IGNORECASE)
# A plain word or phrase ground truth ("red", "Yes", "right angle"): compared as text.
_WORD = re.compile(r"[A-Za-z]+(?:[ '\-]+[A-Za-z]+)*")
# A power whose exponent starts with another numeric power (10^{10^{..}}, 9**9**9, 2^{(3^{..})}),
# or a literal exponent of a million or more.
_TOWER = re.compile(r"(?:\^|\*\*)[\s{(]*[\d.]+\s*(?:\^|\*\*)|(?:\^|\*\*)[\s{(]*\d{7,}")


@dataclass(frozen=True)
class RewardResult:
    """One completion's HFRRF score and what went into it (for the metrics).

    ``reward`` is 1.0 iff ``format_ok and answer_ok``; ``extracted`` is the final answer
    taken from the last ``<answer>`` block (None without one); ``timed_out`` says the
    comparison ran out of time (the answer then counts as wrong).
    """

    reward: float
    format_ok: bool
    answer_ok: bool
    extracted: str | None
    timed_out: bool


_ZERO = RewardResult(0.0, False, False, None, False)


# --- format and answer ----------------------------------------------------------------------


def check_format(completion: str) -> bool:
    """True iff ``completion`` is ``<think>..</think><answer>..</answer>`` and whitespace only.

    No other think/answer tag may appear anywhere (``<Answer>`` and stray closing tags
    included). Linear time; stops scanning at the fifth tag.
    """
    tags = []
    for match in _TAG.finditer(completion):
        tags.append(match)
        if len(tags) > len(_LAYOUT):
            return False
    if tuple(match.group(0) for match in tags) != _LAYOUT:
        return False
    gaps = (completion[: tags[0].start()], completion[tags[1].end(): tags[2].start()], completion[tags[3].end():])
    return not any(gap.strip() for gap in gaps)


def answer_block(completion: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` pair, or None without one."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return completion[start + len("<answer>"): end]


def _too_costly(text: str) -> bool:
    """Refuse what no real answer looks like and could stall sympy (length, power towers)."""
    return len(text) > MAX_ANSWER_CHARS or _TOWER.search(text) is not None


def _as_words(text: str) -> str:
    return " ".join(text.split()).casefold()


def answers_match(answer: str, ground_truth: str) -> tuple[bool, bool]:
    """``(equal, timed_out)`` for an extracted answer against its ground truth.

    The rules are in the module docstring: choice letters, plain words, equal strings,
    then math-verify in a worker process within ``VERIFY_TIMEOUT_S``. Over-long or
    hostile inputs are refused as unequal without starting sympy.
    """
    if len(answer) > 4 * MAX_ANSWER_CHARS or len(ground_truth) > 4 * MAX_ANSWER_CHARS:
        return False, False  # before normalising: keeps a megabyte answer cheap
    pred, gold = normalize_answer(answer), normalize_answer(ground_truth)
    if not pred or not gold:
        return False, False
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return choice_letter(pred) == gold_letter, False
    if len(gold) > 1 and _WORD.fullmatch(gold):
        return _as_words(pred) == _as_words(gold), False
    if pred == gold:
        return True, False
    if _too_costly(pred) or _too_costly(gold):
        return False, False
    return _POOL.verify(gold, pred)


def score_completion(completion: str, ground_truth: str) -> RewardResult:
    """HFRRF for one completion, with the format and answer verdicts (never raises).

    A non-string completion or ground truth scores all zeros/False.
    """
    try:
        if not isinstance(completion, str):
            return _ZERO
        format_ok = check_format(completion)
        block = answer_block(completion)
        if block is None or not isinstance(ground_truth, str):
            return RewardResult(0.0, format_ok, False, None, False)
        extracted = extract_final_answer(block)
        answer_ok, timed_out = answers_match(extracted, ground_truth)
        return RewardResult(float(format_ok and answer_ok), format_ok, answer_ok, extracted, timed_out)
    except Exception:  # a reward must not stop training; a zero is the safe verdict
        log.warning("HFRRF failed on a completion; scoring it 0", exc_info=True)
        return _ZERO


def hard_format_result_reward(completion: str, ground_truth: str) -> float:
    """1.0 if the completion has the think/answer format and the right answer, else 0.0."""
    return score_completion(completion, ground_truth).reward


def batch_rewards(completions: list[str], ground_truths: list[str], max_workers: int = 4) -> list[RewardResult]:
    """``score_completion`` over a batch, ``max_workers`` at a time, results in order.

    Each item is bounded as a single call is; the batch takes at most about
    ``ceil(len / max_workers)`` such bounds.
    """
    if len(completions) != len(ground_truths):
        raise ValueError(f"completions has {len(completions)} items but ground_truths has {len(ground_truths)}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    if not completions:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(completions)), thread_name_prefix="hfrrf") as pool:
        return list(pool.map(score_completion, completions, ground_truths))


# --- verifier processes ------------------------------------------------------------------------

_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from visionr1_trainer.grpo.reward import _serve; _serve()"
)


class _WorkerFailed(RuntimeError):
    """A verifier process did not start, or died."""


class _Worker:
    """One verifier process; JSON lines over its stdin/stdout, one job at a time."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._pending = b""

    @classmethod
    def start(cls) -> _Worker:
        """A new worker, once it has imported math-verify (within ``STARTUP_TIMEOUT_S``)."""
        root = str(Path(__file__).resolve().parents[2])  # the directory holding visionr1_trainer
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT.format(root=root)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            )
        except OSError as exc:
            raise _WorkerFailed(f"cannot start a verifier process: {exc}") from exc
        worker = cls(proc)
        if worker._read_line(time.monotonic() + STARTUP_TIMEOUT_S) != b"ready":
            worker.kill()
            raise _WorkerFailed(f"no verifier process ready within {STARTUP_TIMEOUT_S:.0f} s")
        return worker

    def alive(self) -> bool:
        return self._proc.poll() is None

    def ask(self, gold: str, pred: str, timeout: float) -> dict | None:
        """The worker's reply, or None if it gave none within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            self._proc.stdin.write(json.dumps({"gold": gold, "pred": pred}).encode() + b"\n")
        except OSError:
            return None
        line = self._read_line(deadline)
        try:
            return None if line is None else json.loads(line)
        except ValueError:
            return None

    def _read_line(self, deadline: float) -> bytes | None:
        # poll, not select.select: a trainer can hold more than 1024 file descriptors.
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the worker exited
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """Up to ``size`` verifier processes shared by all threads; a worker that overruns is killed."""

    def __init__(self, size: int) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._warned = False

    def verify(self, gold: str, pred: str) -> tuple[bool, bool]:
        """``(equal, timed_out)`` per math-verify, within about ``VERIFY_TIMEOUT_S``."""
        if not self._slots.acquire(timeout=VERIFY_TIMEOUT_S):
            return False, True
        try:
            return self._verify_on(self._take(), gold, pred)
        except _WorkerFailed as exc:
            self._warn_once(exc)
            return False, True
        finally:
            self._slots.release()

    def _verify_on(self, worker: _Worker, gold: str, pred: str) -> tuple[bool, bool]:
        reply = worker.ask(gold, pred, VERIFY_TIMEOUT_S)
        if not (isinstance(reply, dict) and isinstance(reply.get("ok"), bool)):
            worker.kill()  # overran (or broke): it may be stuck in sympy, so it cannot stay
            return False, True
        with self._lock:
            self._idle.append(worker)
        return reply["ok"], bool(reply.get("slow"))

    def _warn_once(self, exc: Exception) -> None:
        # Once per pool: a batch would otherwise log the same failure hundreds of times.
        if not self._warned:
            self._warned = True
            log.warning("HFRRF answers not checked (scored wrong, timed_out=True): %s", exc)

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.close_pipes()
        return _Worker.start()

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    def forget(self) -> None:
        """In a forked child: drop the parent's workers without killing them."""
        for worker in self._idle:
            worker.close_pipes()
        self._idle = []


_POOL = _WorkerPool(MAX_PROCESSES)


@atexit.register
def _shutdown() -> None:
    # Workers also exit on their own when our end of their stdin closes; this is quicker.
    _POOL.shutdown()


def _after_fork_in_child() -> None:
    # A forked child (a data loader, say) must not talk over its parent's pipes.
    global _POOL
    _POOL.forget()
    _POOL = _WorkerPool(MAX_PROCESSES)


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- inside a verifier process -------------------------------------------------------------------


def _as_latex(text: str) -> str:
    return text if "$" in text else f"${text}$"


def _math_equal(gold: str, pred: str) -> bool:
    """math-verify's verdict, with its SIGALRM timeouts (a worker's main thread only)."""
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold), parsing_timeout=_WORKER_ALARM_S)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=_WORKER_ALARM_S)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_WORKER_ALARM_S))


def _limit_cpu(seconds: int) -> None:
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    wanted = int(used.ru_utime + used.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def _serve() -> None:
    """A verifier process's main loop: one ``{"gold", "pred"}`` line in, one verdict line out."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it closes our stdin
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure and timeout
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print from a library must not corrupt the replies
    _math_equal("1", "1")  # import sympy and compile math-verify's regexes before "ready"
    replies.write(b"ready\n")
    # A GRPO group repeats answers (and a batch its ground truths): remember verdicts.
    verdicts: dict[tuple[str, str], bool] = {}
    for line in sys.stdin.buffer:
        _limit_cpu(_WORKER_CPU_LIMIT_S)
        started = time.monotonic()
        try:
            job = json.loads(line)
            key = (job["gold"], job["pred"])
            ok = verdicts[key] if key in verdicts else _math_equal(*key)
        except Exception:
            key, ok = None, False
        # A False that took the alarm's time is math-verify's timeout, not a verdict.
        slow = not ok and time.monotonic() - started >= _WORKER_ALARM_S
        if key is not None and not slow:
            if len(verdicts) >= _WORKER_CACHE_SIZE:
                verdicts.clear()
            verdicts[key] = ok
        replies.write(json.dumps({"ok": ok, "slow": slow}).encode() + b"\n")
