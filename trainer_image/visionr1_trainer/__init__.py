"""visionr1 data plane: what runs inside a stage's pod (bridge, sft, grpo, eval)."""

__version__ = "0.1.0"
