"""The cold-start SFT stage's settings (LLaMA-Factory's reference run for the defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import (
    CelRule,
    Schema,
    raise_problems,
)
from .training import (
    ActivationCheckpointing,
    LoraSettings,
    _activation_checkpointing_field,
    _collective_timeout_field,
    _lora_field,
)


class SFTSettings(Schema):
    """Cold-start supervised fine-tuning (defaults from the paper's run: Vision-R1's
    LLaMA-Factory config for Qwen2.5-VL-7B, and LLaMA-Factory's own defaults where that
    config sets nothing)."""

    epochs: float = Field(default=2.0, gt=0, le=100, description="Training epochs.")
    learning_rate: float = Field(default=5e-6, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, le=1, description="Fraction of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    cutoff_length: int = Field(
        default=16384, ge=16, le=1_048_576, description="Maximum tokens per training sample."
    )
    per_device_batch_size: int = Field(
        default=1, ge=1, le=1024, description="Samples per device per micro-step."
    )
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=4096,
        description="Micro-steps per optimizer step (4: Vision-R1's 8-GPU config, a global "
        "batch of 8 x 1 x 4 = 32).",
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Training precision."
    )
    deepspeed_zero_stage: Literal[0, 1, 2, 3] = Field(
        default=3,
        description="DeepSpeed ZeRO stage, on GPUs or CPU ranks (0: plain torch data parallelism). "
        "A stage where DeepSpeed cannot run exits 2.",
    )
    activation_checkpointing: ActivationCheckpointing = _activation_checkpointing_field()
    collective_timeout_minutes: float = _collective_timeout_field()
    packing: bool = Field(
        default=False,
        description="Pack several samples per sequence (up to cutoffLength), kept apart as "
        "LLaMA-Factory's neat_packing: positions restart per sample, attention is block-diagonal.",
    )
    freeze_vision_tower: bool = Field(
        default=True,
        description="Keep the vision encoder (patch embedding and blocks) frozen, as "
        "LLaMA-Factory does by default (Vision-R1's config keeps it).",
    )
    freeze_multi_modal_projector: bool = Field(
        default=True,
        description="Keep the vision-language projector (visual.merger) frozen, as "
        "LLaMA-Factory does by default.",
    )
    image_max_pixels: int = Field(
        default=768 * 768, ge=28 * 28, le=100_000_000,
        description="Images above this many pixels are scaled down to it before the image "
        "processor (LLaMA-Factory's image_max_pixels default, 768 x 768).",
    )
    image_min_pixels: int = Field(
        default=32 * 32, ge=1, le=100_000_000,
        description="Images below this many pixels are scaled up to it (LLaMA-Factory's "
        "image_min_pixels default, 32 x 32).",
    )
    save_every_steps: int = Field(
        default=500, ge=1, description="Commit a resumable checkpoint every N optimizer steps."
    )
    seed: int = Field(default=42, ge=0, description="Seed for data order and init.")
    lora: LoraSettings = _lora_field()

    cel_rules = (
        CelRule(
            "self.imageMinPixels <= self.imageMaxPixels",
            "imageMinPixels must not be above imageMaxPixels",
            ".imageMinPixels",
        ),
    )

    @model_validator(mode="after")
    def _image_bounds(self) -> SFTSettings:
        if self.image_min_pixels > self.image_max_pixels:
            raise_problems([("imageMinPixels", f"{self.image_min_pixels} is above imageMaxPixels "
                                               f"({self.image_max_pixels})")])
        return self
