"""Steps and learning rates of the SFT stage: pure functions of the settings and the step.

The learning rate is computed from the step (not kept in a scheduler object), so a
resumed stage needs nothing but the step to continue the schedule, and any optimizer
wrapper with ``param_groups`` (DeepSpeed's ZeRO optimizers included) follows it. The
curves are transformers' ``get_scheduler`` ones: the update of optimizer step ``s``
(0-based) uses the multiplier at ``s``, so with warmup the first update has lr 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class StepPlan:
    micro_batches_per_epoch: int  # per rank
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def step_plan(num_sequences: int, batch_size: int, accumulation: int, epochs: float,
              warmup_ratio: float, world_size: int = 1) -> StepPlan:
    """How many optimizer steps ``epochs`` passes over ``num_sequences`` sequences take.

    An epoch's last step may accumulate fewer micro-batches (as in transformers' Trainer).
    """
    if num_sequences < 1:
        raise ValueError("no training sequences")
    micro = math.ceil(math.ceil(num_sequences / world_size) / batch_size)
    per_epoch = math.ceil(micro / accumulation)
    total = max(1, math.ceil(epochs * per_epoch))
    return StepPlan(micro, per_epoch, total, math.ceil(warmup_ratio * total))


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The fraction of the peak learning rate used by optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def micro_batches_of_step(step: int, plan: StepPlan, accumulation: int) -> list[tuple[int, int]]:
    """``(epoch, micro-batch index)`` of each micro-batch that optimizer step ``step`` uses."""
    epoch, offset = divmod(step, plan.steps_per_epoch)
    first = offset * accumulation
    last = min(first + accumulation, plan.micro_batches_per_epoch)
    return [(epoch, i) for i in range(first, last)]
