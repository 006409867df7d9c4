"""A tiny Qwen2.5-VL built from a config, with a tokenizer trained locally.

Nothing can be downloaded in tests or in the local demo, so both build their model
here: a 2-layer Qwen2.5-VL (hidden size 64, a 2-block vision tower) and a byte-level
BPE tokenizer trained on a small corpus with Qwen's special tokens. It has the real
architecture (M-RoPE, vision merger, image-token checks), so every code path that
runs it runs unchanged on Qwen/Qwen2.5-VL-7B-Instruct. Images are resized to a fixed
56x56, i.e. 4 image tokens each, to keep CPU steps short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .vlm import QWEN_VL_CHAT_TEMPLATE

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# The output-format tags are ordinary (decoded) tokens, one id each, so that a tiny
# model can learn the format with few samples.
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "Final Answer:"]

BASE_CORPUS = [
    "You are a helpful assistant.",
    "How many shapes are in the image? What color is the shape? Which bar is the tallest?",
    "Answer with a number. Answer with the option's letter. Choices: (A) (B) (C) (D) (E)",
    "Let me count them one by one. Wait, let me check again. Hmm, so the answer is",
    "red green blue yellow purple orange black white circle square triangle bar chart",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = . , : ; ( ) ?",
]
IMAGE_SIDE = 56  # pixels: 4x4 patches of 14, merged 2x2 -> 4 image tokens


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*BASE_CORPUS, *corpus], trainer)
    tok.add_tokens(FORMAT_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    hf.chat_template = QWEN_VL_CHAT_TEMPLATE
    return hf


def build_image_processor(image_side: int = IMAGE_SIDE):
    """Qwen2-VL's image processor (PIL backend: no torchvision), images at about image_side^2 pixels."""
    from transformers import Qwen2VLImageProcessorPil

    pixels = image_side * image_side
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)


def tiny_config(tokenizer, hidden_size: int = 64, layers: int = 2):
    """A Qwen2.5-VL config small enough to train on a laptop CPU in minutes."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden_size // heads
    # M-RoPE splits each head's rotary half-dimension into (temporal, height, width).
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "window_size": 28,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_vlm(save_dir: str | Path, corpus: Iterable[str] = (), seed: int = 0,
                   image_side: int = IMAGE_SIDE, **config_kwargs) -> Path:
    """Build, initialise (seeded) and save a tiny Qwen2.5-VL with its tokenizer and processor.

    The directory then loads like any hub checkpoint (``load_vlm``).
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **config_kwargs))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    build_image_processor(image_side).save_pretrained(save_dir)
    return save_dir
