"""Group sampling with a shared prompt prefix: each prompt (and its images) is encoded once.

GRPO samples ``G`` completions of every prompt. ``generate`` on the prompt repeated G
times runs the prompt, and the vision encoder on its images, G times over. Here the
prompt is prefilled once, its KV cache is repeated G times (prompt-major, the order the
trainer expects), and a lean decoding loop samples all ``P * G`` rows together. The
tokens are those ``generate`` would sample from the same distributions (greedy decoding
gives identical sequences; see the tests).

Positions: Qwen2-VL / Qwen2.5-VL give text tokens after an image the rotary position
``index + rope_delta`` (the delta the prefill computed per row, stored on the model);
other causal LMs use ``index``. Left padding is not counted in the index.
"""

from __future__ import annotations

import time

import torch

from ..models.vlm import EncodedPrompts


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from ``(B, V)`` logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


def rope_deltas(model) -> torch.Tensor | None:
    """``(B, 1)`` Qwen-VL rope deltas the last prefill left, or None.

    ``model`` is a transformers module (inside ``gathered_for_generation``) or one of
    our engines, which expose the same reading without exposing their module.
    """
    if hasattr(type(model), "rope_deltas"):
        return model.rope_deltas
    return getattr(getattr(model, "model", None), "rope_deltas", None)


def computes_own_positions(model) -> bool:
    if hasattr(type(model), "computes_own_positions"):
        return model.computes_own_positions
    return hasattr(getattr(model, "model", None), "rope_deltas")


def prefix_position_ids(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Positions for a left-padded prefix (``inputs``: its model inputs) that do not count
    the padding, or None.

    Qwen-VL models compute their own (3-D, from the attention mask and the image tokens)
    for prompts with images: None. Other causal LMs, and Qwen-VL on text-only prompts,
    would number the padding too when given no positions, and then disagree with the
    pad-free positions of the tokens that follow; Qwen-VL repeats 2-D positions on its
    three axes, which is what its own rule gives text.
    """
    if computes_own_positions(model) and "pixel_values" in inputs:
        return None
    return (inputs["attention_mask"].long().cumsum(dim=-1) - 1).clamp(min=0)


def prefix_rope_deltas(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``(B, 1)`` M-RoPE deltas of the prefix just run on ``inputs``, or None (no images:
    its positions were the pad-free ones of ``prefix_position_ids``, nothing to add).

    transformers recomputes a Qwen-VL model's ``rope_deltas`` only for inputs with
    images: after a text-only prefix it still holds an earlier call's, of another batch.
    """
    return rope_deltas(model) if "pixel_values" in inputs else None


def step_mask_kernel(model) -> str | None:
    """The attention kernel (``sdpa`` or ``eager``) when a decoding step may be handed a
    ready mask (``decode_mask``), else None: other kernels (flash attention) take the 2-D
    mask, and sliding-window layers need their own window, which only transformers builds."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    kernel = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    sliding = getattr(text, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(text, "layer_types", None) or ())
    return kernel if kernel in ("sdpa", "eager") and not sliding else None


def decode_mask(attention: torch.Tensor, kernel: str | None, dtype: torch.dtype, padded: bool = True):
    """The attention mask of one decoding step, ready for ``kernel`` (``step_mask_kernel``).

    ``attention`` ``(B, L)``: 1 for the tokens a row has (its prompt without left padding,
    then its completion so far), the last being the one fed now. One query token sees
    every key before it, so the step's causal mask is the padding mask itself: ``(B, 1, 1,
    L)``, True to attend for ``sdpa`` (None when no row is padded: no mask at all), 0 or
    the dtype's minimum added to the scores for ``eager``. These are the masks
    transformers would build from the 2-D one, which it otherwise does again at every
    step (about a tenth of a tiny model's decoding time on CPU); a 4-D mask it uses as
    it is. ``kernel`` None: the 2-D mask, for transformers to build.
    """
    if kernel == "sdpa":
        return attention[:, None, None, :].bool() if padded else None
    if kernel == "eager":
        blocked = (attention[:, None, None, :] == 0).to(dtype)
        return blocked * torch.finfo(dtype).min
    return attention


def generate_groups(
    model,
    prompts: EncodedPrompts,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    image_token_id: int,
    suppress_token_ids: list[int] = (),
    with_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(P * G, T)`` completion ids (right-padded with ``pad_token_id``), the sampler's
    ``(P * G, T)`` log-probs of those tokens when ``with_logprobs`` (temperature-scaled; a
    check on the trainer's own forward pass), and the seconds taken.

    Decoding runs under ``torch.inference_mode`` (no autograd bookkeeping at all: about a
    tenth of a tiny model's decoding time); what it returns is stacked outside it, so
    they are ordinary tensors the training forward can take.
    """
    start = time.perf_counter()
    with torch.inference_mode():
        tokens, logprobs = _decode(model, prompts, group_size, max_new_tokens, temperature, top_p, eos_token_id,
                                   pad_token_id, image_token_id, suppress_token_ids, with_logprobs)
    sampled = torch.stack(logprobs, dim=1).cpu() if with_logprobs else None
    return torch.stack(tokens, dim=1).cpu(), sampled, time.perf_counter() - start


def _decode(model, prompts, group_size, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id,
            image_token_id, suppress_token_ids, with_logprobs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``generate_groups``' prefill and decoding loop: the sampled tokens and their log-probs, a step each."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompts.model_inputs(image_token_id).items()}
    out = model(**inputs, position_ids=prefix_position_ids(model, inputs), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)  # prompt-major: p0 x G, p1 x G, ...
    rows = inputs["input_ids"].shape[0] * group_size
    attention = inputs["attention_mask"].repeat_interleave(group_size, dim=0)
    real_len = attention.sum(dim=1)  # prompt tokens, padding excluded
    deltas = prefix_rope_deltas(model, inputs)
    deltas = deltas.to(device).repeat_interleave(group_size, dim=0).view(-1) if deltas is not None else None
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
    suppress = torch.as_tensor(list(suppress_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    kernel, dtype, padded = step_mask_kernel(model), out.logits.dtype, not bool(attention.all())
    for step in range(max_new_tokens):
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        nxt = sample_next(logits, temperature, top_p)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        if with_logprobs:
            scaled = logits.float() / temperature if temperature > 0 else logits.float()
            logprobs.append(torch.log_softmax(scaled, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        tokens.append(nxt)
        finished |= nxt == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
        position = (real_len + step).unsqueeze(1)  # (rows, 1): index of the token being fed
        if deltas is not None:  # M-RoPE: the same position on the t, h, w axes for text
            position = (position + deltas.unsqueeze(1)).unsqueeze(0).expand(3, -1, -1)
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=decode_mask(attention, kernel, dtype, padded),
                    position_ids=position, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    return tokens, logprobs
