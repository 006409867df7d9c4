"""The policy as the training engine wraps it: log-probs straight from hidden states, chunked.

A Hugging Face causal LM's forward returns ``(B, L, V)`` logits; the GRPO loss needs only
the ``(B, T)`` log-probs of the sampled tokens (and their entropies). ``LogprobModel``
runs the model's backbone to hidden states and hands them to its output projection with
the target ids, which computes ``chunked_logprobs_and_entropy`` (grpo/algos.py): full-
vocabulary logits exist only ``chunk_tokens`` rows at a time, in forward and in backward.

Why a module and not a function over ``lm_head.weight``: under ZeRO-3 a parameter is
gathered only inside the forward of the module that owns it (DeepSpeed's pre-forward
hooks). ``ChunkedLMHead`` *is* the model's ``lm_head`` (installed in its place, sharing its
weight, tied or not), so calling it gathers the weight for the chunked computation, and
DeepSpeed's pre-backward hook on its outputs gathers it again for the recomputation in
backward. ``LogprobModel``'s children are the backbone ``model`` and that ``lm_head``, the
two children of a Qwen2-VL / Qwen2.5-VL ``*ForConditionalGeneration``, so its parameter and
state-dict names are the Hugging Face checkpoint's. Generation through the original model
still works: called without targets, ``ChunkedLMHead`` is the plain linear layer.

Use (grpo/batch.py and grpo/trainer.py):

    engine = make_engine(lambda: LogprobModel(load_model(...)), ...)   # before the engine wraps it
    logprobs, entropy = engine(targets=completion_ids, temperature=t,
                               **batch.model_inputs(rows, device))      # full rows, one forward
    # prompt shared by its group: the prefix once (an ordinary forward), then the completions
    prefix = engine(**prompt_inputs, position_ids=..., use_cache=True, logits_to_keep=1)
    logprobs, entropy = engine(targets=completion_ids, temperature=t,
                               first_logits=prefix.logits[:, -1:].index_select(0, index),
                               input_ids=completion_ids, attention_mask=..., position_ids=...,
                               past_key_values=cache, use_cache=True)
    # generation (HF rollouts) and anything else: engine(**inputs) is the HF forward
"""

from __future__ import annotations

from typing import Any

import torch

from .algos import LOGPROB_CHUNK_TOKENS, chunked_logprobs_and_entropy, token_logprobs_and_entropy


class ChunkedLMHead(torch.nn.Module):
    """An output projection ``(V, H)``: logits without targets, chunked log-probs with them."""

    def __init__(self, head: torch.nn.Linear, chunk_tokens: int = LOGPROB_CHUNK_TOKENS):
        super().__init__()
        if getattr(head, "bias", None) is not None:
            # Qwen2-VL / Qwen2.5-VL heads have none; a bias would need adding per chunk too.
            raise ValueError("ChunkedLMHead supports output projections without bias")
        self.weight = head.weight  # the same Parameter: tying and optimizer state stay as they are
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                temperature: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` ``(B, T, H)``. Without ``targets``: ``(B, T, V)`` logits (generation).
        With ``targets`` ``(B, T)``: ``(logprobs, entropy)``, each ``(B, T)`` float32."""
        if targets is None:
            return torch.nn.functional.linear(hidden, self.weight)
        return chunked_logprobs_and_entropy(hidden, self.weight, targets, temperature, self.chunk_tokens)


def install_chunked_head(model, chunk_tokens: int = LOGPROB_CHUNK_TOKENS) -> ChunkedLMHead:
    """Put a ``ChunkedLMHead`` in place of ``model``'s output projection (idempotent).

    Call it before an engine wraps the model: DeepSpeed registers its hooks on the modules
    it finds at ``deepspeed.initialize``.
    """
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedLMHead):
        head.chunk_tokens = chunk_tokens
        return head
    chunked = ChunkedLMHead(head, chunk_tokens)
    model.set_output_embeddings(chunked)
    return chunked


class LogprobModel(torch.nn.Module):
    """A ``*ForConditionalGeneration`` whose forward returns completion log-probs.

    Children ``model`` (the backbone) and ``lm_head`` (a ``ChunkedLMHead``): the Hugging
    Face names. ``hf`` is the original model (not a child: its parameters are these), for
    ``config``, ``generate``, ``save_pretrained``.
    """

    def __init__(self, hf_model, chunk_tokens: int = LOGPROB_CHUNK_TOKENS):
        super().__init__()
        head = install_chunked_head(hf_model, chunk_tokens)
        self.model = hf_model.model
        self.lm_head = head
        object.__setattr__(self, "hf", hf_model)  # unregistered on purpose: no second set of names

    @property
    def config(self):
        return self.hf.config

    @property
    def name_or_path(self) -> str:
        return self.hf.name_or_path

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def save_pretrained(self, directory, **kwargs) -> None:
        self.hf.save_pretrained(directory, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.hf.gradient_checkpointing_enable(**kwargs)  # the same layer objects as self.model's

    def forward(self, targets: torch.Tensor | None = None, temperature: float = 1.0,
                first_logits: torch.Tensor | None = None, **inputs: Any):
        """With ``targets`` ``(b, T)``: ``(logprobs, entropy)`` of them, each ``(b, T)`` float32.

        ``inputs`` are the model's (``input_ids``, ``attention_mask``, ``pixel_values``,
        ``image_grid_thw``, ``mm_token_type_ids``, ``position_ids``, ``past_key_values``...).
        Full rows (prompt + completion): the last ``T + 1`` positions predict the targets.
        On a cached prefix (``inputs`` are the ``T`` completion tokens): ``first_logits``
        ``(b, 1, V)``, the prefix pass's last logits, predict token 0 and the completion's
        positions but the last predict the rest.

        Without ``targets``: exactly the Hugging Face model's forward and output (logits,
        cache), for generation and for the prefix pass (``logits_to_keep=1``).
        """
        if targets is None:
            return self.hf(**inputs)
        inputs.setdefault("use_cache", False)  # a training forward keeps no KV cache unless asked
        hidden = self.model(**inputs).last_hidden_state  # (b, L, H)
        T = targets.shape[1]
        if first_logits is None:
            return self.lm_head(hidden[:, -(T + 1):-1], targets=targets, temperature=temperature)
        first_lp, first_ent = token_logprobs_and_entropy(first_logits, targets[:, :1], temperature)
        if T == 1:
            return first_lp, first_ent
        rest_lp, rest_ent = self.lm_head(hidden[:, :-1], targets=targets[:, 1:], temperature=temperature)
        return torch.cat([first_lp, rest_lp], dim=1), torch.cat([first_ent, rest_ent], dim=1)
