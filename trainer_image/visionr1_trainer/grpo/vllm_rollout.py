"""Rollouts with a colocated vLLM engine (GPU), refreshed from the policy after each update.

The engine lives in the training process on the same GPU (as TRL's and verl's colocate
modes do): it is created once per stage from the stage's starting weights, sleeps
(frees its KV cache) while the policy trains, and gets the policy's new weights pushed
in after every optimizer step, so every rollout samples from the current policy.
vLLM does its own image processing, so it receives the chat text and the PIL images;
the token ids it returns are the same tokenizer's, and join the HF-side prompt ids for
the training forward pass.

Only the request building and weight naming are pure (and unit-tested on CPU); the rest
needs vllm and a GPU (``make gpu-smoke``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import torch

from ..models.vlm import EncodedPrompts
from .rollout import Rollout, SamplingSettings, finish_rollout, vision_token_ids


def vllm_requests(prompts: EncodedPrompts) -> list[dict[str, Any]]:
    """One vLLM prompt dict per kept prompt: chat text plus its images."""
    out = []
    for text, images in zip(prompts.chat_texts, prompts.images):
        request: dict[str, Any] = {"prompt": text}
        if images:
            request["multi_modal_data"] = {"image": list(images)}
        out.append(request)
    return out


def sampling_kwargs(sampling: SamplingSettings, seed: int | None, banned: list[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments equivalent to the HF backend's sampling."""
    kwargs: dict[str, Any] = {
        "n": sampling.num_generations,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": -1,
        "max_tokens": sampling.max_completion_length,
        "min_tokens": 1,
        "seed": seed,
        "detokenize": False,
    }
    if banned:
        # The same guard as HF's bad_words_ids: never sample an image slot token.
        kwargs["logit_bias"] = {tid: -100.0 for tid in banned}
    return kwargs


def pad_completions(token_lists: Iterable[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad completion token lists into ``(B, T)``."""
    rows = [list(t) for t in token_lists]
    width = max((len(r) for r in rows), default=1) or 1
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def policy_weights(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The policy's parameters under the names the Hugging Face checkpoint uses.

    vLLM's Qwen2.5-VL ``load_weights`` maps checkpoint names itself (both the
    ``model.language_model.*`` and the older ``model.*``/``visual.*`` layouts).
    """
    return [(name, tensor.detach()) for name, tensor in state_dict.items()]


class VLLMRollout:
    def __init__(self, policy, tokenizer, env, config):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights reachable
        from vllm import LLM

        self.tokenizer = tokenizer
        self.seed = config.grpo.seed + env.rank
        self.banned = vision_token_ids(tokenizer)
        source = getattr(policy, "name_or_path", None) or config.model.name
        self.llm = LLM(
            model=source,
            tokenizer=source,
            dtype=str(next(policy.parameters()).dtype).replace("torch.", ""),
            max_model_len=config.grpo.max_prompt_length + config.ptst.max_completion_length,
            gpu_memory_utilization=float(os.environ.get("VISIONR1_VLLM_GPU_MEMORY", "0.35")),
            enable_sleep_mode=True,
            seed=self.seed,
            limit_mm_per_prompt={"image": int(os.environ.get("VISIONR1_VLLM_MAX_IMAGES", "4"))},
        )
        self.llm.sleep(level=1)  # free the KV cache until the first rollout

    def generate(self, prompts: EncodedPrompts, images_per_prompt: list[int], sampling: SamplingSettings) -> Rollout:
        from vllm import SamplingParams

        params = SamplingParams(**sampling_kwargs(sampling, self.seed, self.banned))
        self.llm.wake_up()
        start = time.perf_counter()
        try:
            outputs = self.llm.generate(vllm_requests(prompts), params, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        # Prompt-major order: prompt 0's n samples, then prompt 1's, as the trainer expects.
        tokens = [list(sample.token_ids) for out in outputs for sample in out.outputs]
        ids = pad_completions(tokens, self.tokenizer.pad_token_id)
        return finish_rollout(ids, self.tokenizer, sampling.max_completion_length, time.perf_counter() - start)

    def sync_weights(self, engine) -> None:
        """Push the policy's current weights into vLLM (after an optimizer step).

        ``engine.full_state_dict()`` is collective under ZeRO-3, so every rank calls it.
        """
        weights = policy_weights(engine.full_state_dict())

        def load(worker, weights=weights):
            worker.model_runner.model.load_weights(weights=weights)

        self.llm.wake_up(tags=["weights"]) if _accepts_tags(self.llm) else self.llm.wake_up()
        try:
            self.llm.collective_rpc(load)
            self.llm.reset_prefix_cache()  # cached prefixes were computed by the old weights
        finally:
            self.llm.sleep(level=1)


def _accepts_tags(llm) -> bool:
    import inspect

    return "tags" in inspect.signature(llm.wake_up).parameters
