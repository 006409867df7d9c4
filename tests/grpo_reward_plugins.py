"""Reward plug-ins for tests/test_grpo_rewards.py (imported by name in a plug-in worker)."""

from __future__ import annotations

import time


def says_red(completion: str, answer: str, problem: str) -> float:
    """1 when the completion names red, whatever the question (a reward HFRRF does not give)."""
    return 1.0 if "red" in completion.lower() else 0.0


def length(completion: str, answer: str, problem: str) -> float:
    return len(completion) / 100.0


def echo_answer(completion: str, answer: str, problem: str) -> float:
    return float(len(answer)) + (0.5 if "color" in problem else 0.0)


def raises(completion: str, answer: str, problem: str) -> float:
    if completion.startswith("boom"):
        raise RuntimeError("a broken plug-in")
    return 2.0


def hangs(completion: str, answer: str, problem: str) -> float:
    if completion.startswith("hang"):
        time.sleep(60)
    return 3.0


def not_a_number(completion: str, answer: str, problem: str):
    return float("nan") if completion.startswith("nan") else "x"
