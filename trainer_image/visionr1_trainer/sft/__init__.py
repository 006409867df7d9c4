"""Cold-start SFT: fine-tune the base model on the cold-start CoT set (Vision-R1-CI).

``run(config)`` is the stage entrypoint (``python -m visionr1_trainer sft``); the loop is
in ``train``, sequence building (chat template, assistant-only labels) and the compact
encoded set in ``data``, LLaMA-Factory's image resize in ``images``, packing, data order
and collated batches in ``batches``, the encoding cached with the stage's work in
``cache``, steps and learning rates in ``schedule``.
"""

from __future__ import annotations

from typing import Any


def run(config) -> dict[str, Any]:
    """Run the SFT stage for an ``SFTStageConfig``; returns the compact summary."""
    from .train import run as run_training

    return run_training(config)
