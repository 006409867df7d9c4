"""Modality Bridging: build the cold-start chain-of-thought data set (Vision-R1-cold).

``run(config)`` is the stage entrypoint (``python -m visionr1_trainer bridge``); the
pipeline is in ``pipeline``, the generation backends in ``backends``, the filters in
``filters``, the statistics in ``stats`` and the paper's prompts in ``prompts``.
"""

from __future__ import annotations

from typing import Any


def run(config) -> dict[str, Any]:
    """Run the bridge stage for a ``BridgeStageConfig``; returns the compact summary."""
    from .pipeline import run as run_pipeline

    return run_pipeline(config)
