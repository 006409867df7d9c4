"""Training knobs the SFT and GRPO stages share: activation checkpointing, the collective
timeout, LoRA."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..schema import (
    Schema,
)


AUTO_CHECKPOINTING_TOKENS = 2048

ActivationCheckpointing = Literal["auto", "on", "off"]


def activation_checkpointing_on(setting: str, sequence_tokens: int) -> bool:
    """Whether a stage recomputes activations in backward: ``on``, ``off``, or ``auto`` by length."""
    return setting == "on" or (setting == "auto" and sequence_tokens >= AUTO_CHECKPOINTING_TOKENS)


def _activation_checkpointing_field():
    return Field(
        default="auto",
        description="Recompute each layer's activations in backward instead of keeping them "
        f"(memory for time): on, off, or auto (on when a sequence can reach {AUTO_CHECKPOINTING_TOKENS} tokens).",
    )


def _collective_timeout_field():
    return Field(
        default=60.0, gt=0, le=1440,
        description="Minutes a rank waits in a collective (barrier, all-reduce) before failing; "
        "longer than a checkpoint upload, which the other ranks wait for.",
    )


class LoraSettings(Schema):
    """LoRA (Hu et al., arXiv 2106.09685, through peft): low-rank adapters on the language
    model's linear layers instead of full fine-tuning; merged into the committed model."""

    enabled: bool = Field(
        default=False,
        description="Train LoRA adapters instead of every weight (the paper: off, full fine-tuning). "
        "The committed model is the base with W + (alpha / rank) x B A merged in: a plain model.",
    )
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r of each adapter.")
    alpha: float = Field(default=32.0, gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on each adapter's input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, max_length=32,
        description="Names of the language model's linear layers that get adapters (the vision "
        "tower never does); every other language-model weight stays frozen.",
    )


def _lora_field():
    return Field(default_factory=LoraSettings, description="LoRA adapters instead of full fine-tuning (peft).")
