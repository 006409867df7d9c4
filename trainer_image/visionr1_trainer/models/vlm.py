"""Qwen2-VL / Qwen2.5-VL inputs: chat prompts with images, tokenised the way the model expects.

A Qwen2.5-VL prompt carries one ``<|image_pad|>`` per merged vision patch of each
image, between ``<|vision_start|>`` and ``<|vision_end|>``; the model checks that the
count matches the image features and raises "Image features and image tokens do not
match" otherwise. Everything that builds model inputs goes through ``encode_prompts``
so that count is right by construction, and prompts too long to keep whole are dropped
and counted, never cut into their image tokens.

We use the tokenizer and the image processor directly rather than the combined
``Qwen2_5_VLProcessor``: the latter insists on a video processor, which needs
torchvision, which the CPU image does not carry. The expansion below is the same one
the processor performs (``image_grid_thw.prod() // merge_size**2`` tokens per image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = "<image>"  # how geometry3k-style problems mark the image

# Qwen2.5-VL's chat format, kept minimal: a system turn, then user/assistant turns whose
# content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



def user_message(question: str, num_images: int) -> dict[str, Any]:
    """One user turn: the images first (Qwen's convention), then the question text.

    A geometry3k-style ``<image>`` marker in the question is removed: the images are
    placed by the chat template.
    """
    text = question.replace(IMAGE_PLACEHOLDER, "").strip()
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def render_prompt(tokenizer, question: str, num_images: int, system: str | None = None) -> str:
    """The chat-formatted prompt text, one ``<|image_pad|>`` per image (not yet expanded)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append(user_message(question, num_images))
    template = tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def expand_image_tokens(text: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the i-th ``<|image_pad|>`` with ``tokens_per_image[i]`` copies of it."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"prompt has {len(pieces) - 1} image slots but {len(tokens_per_image)} images were given"
        )
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_TOKEN * int(count) + piece)
    return "".join(out)


@dataclass
class EncodedPrompts:
    """A batch of prompts ready for ``generate``/``forward``.

    ``input_ids``/``attention_mask``: (batch, prompt_len), left-padded so that every
    completion starts at the same column. ``pixel_values``: (total_patches, patch_dim)
    for all images of the batch in order; ``image_grid_thw``: (num_images, 3).
    ``kept``: indexes (into the input lists) of the prompts that were encoded;
    ``dropped_too_long``: indexes of prompts that did not fit ``max_prompt_length``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    kept: list[int]
    dropped_too_long: list[int] = field(default_factory=list)
    # The chat texts before image-token expansion and the images, per kept prompt:
    # what engines that run their own multimodal processing (vLLM) take.
    chat_texts: list[str] = field(default_factory=list)
    images: list[list[Any]] = field(default_factory=list)

    def model_inputs(self, image_token_id: int) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
            out["image_grid_thw"] = self.image_grid_thw
            out["mm_token_type_ids"] = mm_token_types(self.input_ids, image_token_id)
        return out


def mm_token_types(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, L) 1 on image tokens, 0 elsewhere.

    Qwen2.5-VL builds its 3-D (time, height, width) rotary positions from these; without
    them it silently falls back to 1-D text positions over the image tokens, which is
    not what the model was trained with.
    """
    return (input_ids == image_token_id).int()


def encode_prompts(
    tokenizer,
    image_processor,
    questions: Sequence[str],
    images: Sequence[Sequence[Any]],
    max_prompt_length: int,
    system: str | None = None,
) -> EncodedPrompts:
    """Tokenise chat prompts with their images; drop (and report) prompts that are too long.

    ``images[i]`` is the list of PIL images of ``questions[i]`` (may be empty).
    """
    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    texts, chat_texts, kept, dropped, vision = [], [], [], [], []
    for i, (question, imgs) in enumerate(zip(questions, images)):
        feats = image_processor(images=list(imgs), return_tensors="pt") if imgs else None
        counts = [int(t.prod()) // merge**2 for t in feats["image_grid_thw"]] if feats else []
        chat = render_prompt(tokenizer, question, len(imgs), system)
        text = expand_image_tokens(chat, counts)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_length:
            # Truncating would cut image tokens or the question: drop and count instead.
            dropped.append(i)
            continue
        texts.append(text)
        chat_texts.append(chat)
        kept.append(i)
        if feats is not None:
            vision.append(feats)
    if not texts:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return EncodedPrompts(empty, empty, None, None, [], dropped)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    pixel_values = torch.cat([v["pixel_values"] for v in vision]) if vision else None
    grid = torch.cat([v["image_grid_thw"] for v in vision]) if vision else None
    return EncodedPrompts(
        enc["input_ids"], enc["attention_mask"], pixel_values, grid, kept, dropped,
        chat_texts=chat_texts, images=[list(images[i]) for i in kept],
    )
