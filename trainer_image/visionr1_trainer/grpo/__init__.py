"""GRPO with Progressive Thinking Suppression Training (PTST): the RL stage of Vision-R1."""
