"""GRPO with Progressive Thinking Suppression Training (PTST): the RL stage of Vision-R1."""


def run(config):
    """Entry point of ``python -m visionr1_trainer grpo`` (imported lazily: torch is heavy)."""
    from .trainer import run as run_stage

    return run_stage(config)
