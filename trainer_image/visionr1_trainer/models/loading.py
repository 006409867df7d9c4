"""Load a vision-language model with its tokenizer and image processor."""

from __future__ import annotations

from typing import Any

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def torch_dtype(name: str, device: str):
    """The torch dtype for a spec dtype name; ``auto`` is bf16 on GPU, fp32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, DTYPES[name])


def load_processor_parts(source: str) -> tuple[Any, Any]:
    """The tokenizer and image processor saved with a model (or on the hub under ``source``)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = AutoImageProcessor.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, image_processor


def load_vlm(source: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: str = "cpu",
             processor: str | None = None):
    """``(model, tokenizer, image_processor)`` from a directory or hub id."""
    model = load_model(source, dtype, attn_implementation, device)
    tokenizer, image_processor = load_processor_parts(processor or source)
    return model, tokenizer, image_processor


def load_model(source: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: str = "cpu"):
    """The model alone. Under a live ZeRO-3 ``HfDeepSpeedConfig`` it is partitioned as it
    loads (``deepspeed.zero.Init``), each weight already on its rank's device."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=torch_dtype(dtype, device), attn_implementation=attn_implementation
    )
    return model if is_deepspeed_zero3_enabled() else model.to(device)


def load_model_config(source: str):
    """The model's config without its weights (the engine sizes ZeRO buckets from it)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)
