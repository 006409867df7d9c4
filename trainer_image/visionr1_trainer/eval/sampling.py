"""Sampling benchmark completions: the ``hf`` backend (CPU or GPU) and ``vllm`` (GPU).

Both take ``EvalItem``s and return one ``Sample`` per item, in order, with the paper's
evaluation settings by default (temperature 0.6, top_p 0.95, 16000 new tokens). The
prompt is the benchmark's own, in the chat template of the model's tokenizer, presented
as the SFT and GRPO stages present their questions.

* ``hf``: the GRPO stage's shared-prefix sampler (``grpo.sampler.generate_groups``) with
  one sample per prompt, ``HF_BATCH_SIZE`` prompts at a time.
* ``vllm``: an offline engine over all of the pod's GPUs (tensor parallel), driven as the
  GRPO rollout drives it (``grpo.vllm_rollout``: chat text plus images per request, the
  same sampling arguments), completions decoded with the same tokenizer.

Prompts longer than ``MAX_PROMPT_TOKENS`` (image tokens included) are not run; they come
back with ``error="prompt_too_long"`` and are scored wrong. ``sample_with_retries``
resamples a completion that lacks ``</answer>`` up to ``maxRetries`` times, as the
paper's evaluation did, and counts the attempts.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ..models.vlm import IMAGE_TOKEN, encode_prompts
from ..runtime import StageStopped, stop_requested
from .benchmarks import EvalItem

log = logging.getLogger(__name__)

# Longest prompt run, image tokens included (a MathVista figure at Qwen2.5-VL's default
# resolution is up to a few thousand tokens).
MAX_PROMPT_TOKENS = 8192
HF_BATCH_SIZE = 8
# Prompts encoded (images processed on the CPU) per vLLM call; bounds host memory.
VLLM_CHUNK = 256
VLLM_MAX_IMAGES_PER_PROMPT = 4
ANSWER_CLOSE = "</answer>"


@dataclass(frozen=True)
class Sample:
    """One completion. ``text`` is None exactly when ``error`` is set."""

    text: str | None
    tokens: int = 0
    truncated: bool = False
    error: str | None = None


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float
    top_p: float


class Sampler(Protocol):
    def generate(self, items: Sequence[EvalItem], seed: int) -> list[Sample]: ...

    def close(self) -> None: ...


def prompt_text(item: EvalItem) -> str:
    """What the model is asked: the benchmark's prompt, as is.

    The SFT and GRPO stages present questions the same way (``models.vlm.user_message``,
    no added instruction; the cold-start data teaches the format), so a trained model is
    scored on the prompts it was trained on. A model that does not answer in the format
    is still scored through ``extract_answer``'s fallbacks, and counted in the
    format-failure rate.
    """
    return item.question


def needs_retry(sample: Sample) -> bool:
    """A completion that ran but has no ``</answer>`` (the paper's criterion for resampling)."""
    return sample.error is None and ANSWER_CLOSE not in (sample.text or "")


def sample_with_retries(generate: Callable[[list[EvalItem], int], list[Sample]], items: Sequence[EvalItem],
                        max_retries: int, seed: int) -> tuple[list[Sample], list[int]]:
    """``(final samples, attempts per item)``: up to ``1 + max_retries`` attempts per item.

    Attempt ``k`` samples with seed ``seed + k`` so that a retry is a new draw. Prompts too
    long to run are attempted once (``attempts == 0`` would hide them; they count 1).
    """
    samples: list[Sample | None] = [None] * len(items)
    attempts = [0] * len(items)
    pending = list(range(len(items)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        for i, sample in zip(pending, generate([items[i] for i in pending], seed + attempt)):
            samples[i], attempts[i] = sample, attempts[i] + 1
        pending = [i for i in pending if needs_retry(samples[i])]
    return samples, attempts


def _check_stop() -> None:
    # Between batches: a unit's samples are committed only when all of it is done, so a
    # stop loses at most the unit in flight (committed units are skipped on restart).
    if stop_requested():
        raise StageStopped({"message": "stopped between sampling batches"})


# --- hf --------------------------------------------------------------------------------------


def encode_items(tokenizer, image_processor, items: Sequence[EvalItem]):
    """The items' prompts (images included) encoded once, and one sample per item that says
    ``prompt_too_long`` until a sampler fills in those it kept."""
    prompts = encode_prompts(tokenizer, image_processor, [prompt_text(it) for it in items],
                             [it.load_images() for it in items], MAX_PROMPT_TOKENS)
    return prompts, [Sample(None, error="prompt_too_long") for _ in items]


class HFSampler:
    """A transformers model sampling with the GRPO stage's shared-prefix sampler."""

    def __init__(self, model_dir: str, processor_dir: str, dtype: str, attn: str, device: str,
                 settings: SamplingSettings, batch_size: int = HF_BATCH_SIZE):
        from ..grpo.rollout import vision_token_ids
        from ..models.loading import load_vlm

        self.model, self.tokenizer, self.image_processor = load_vlm(model_dir, dtype, attn, device, processor_dir)
        self.model.eval()
        self.settings, self.batch_size = settings, batch_size
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.suppress = vision_token_ids(self.tokenizer)

    def generate(self, items: Sequence[EvalItem], seed: int) -> list[Sample]:
        import torch

        torch.manual_seed(seed)
        out: list[Sample] = []
        for start in range(0, len(items), self.batch_size):
            _check_stop()
            out += self._batch(items[start:start + self.batch_size])
        return out

    def _batch(self, items: Sequence[EvalItem]) -> list[Sample]:
        from ..grpo.rollout import finish_rollout
        from ..grpo.sampler import generate_groups

        s = self.settings
        prompts, out = encode_items(self.tokenizer, self.image_processor, items)
        if not prompts.kept:
            return out
        ids, _, seconds = generate_groups(
            self.model, prompts, 1, s.max_tokens, s.temperature, s.top_p, self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id, self.image_token_id, self.suppress,
        )
        rollout = finish_rollout(ids, self.tokenizer, s.max_tokens, seconds)
        for row, index in enumerate(prompts.kept):
            length = int(rollout.lengths[row])
            text = self.tokenizer.decode(rollout.completion_ids[row, :length], skip_special_tokens=True)
            out[index] = Sample(text, length, bool(rollout.truncated[row]))
        return out

    def close(self) -> None:
        import torch

        self.model = None  # the next label's model loads after this one is freed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- vllm ------------------------------------------------------------------------------------


def vllm_engine_kwargs(model_dir: str, processor_dir: str, dtype: str, max_tokens: int, gpus: int,
                       seed: int) -> dict:
    """``vllm.LLM`` arguments: the whole pod's GPUs, room for the longest prompt plus the budget."""
    return {
        "model": model_dir,
        "tokenizer": processor_dir,
        "dtype": dtype,
        "tensor_parallel_size": max(gpus, 1),
        "max_model_len": MAX_PROMPT_TOKENS + max_tokens,
        "seed": seed,
        "limit_mm_per_prompt": {"image": VLLM_MAX_IMAGES_PER_PROMPT},
        "trust_remote_code": False,
    }


class VLLMSampler:
    """An offline vLLM engine on the stage's GPUs."""

    def __init__(self, model_dir: str, processor_dir: str, dtype: str, settings: SamplingSettings, seed: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("eval backend 'vllm' needs a CUDA GPU; use backend 'hf' on CPU")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("eval backend 'vllm' needs vLLM, which this installation lacks (it is in "
                               f"the trainer image's gpu extra); use backend 'hf' ({exc})") from exc
        from ..grpo.rollout import vision_token_ids
        from ..models.loading import load_processor_parts

        self.tokenizer, self.image_processor = load_processor_parts(processor_dir)
        self.banned = vision_token_ids(self.tokenizer)
        self.settings = settings
        if processor_dir != model_dir:
            # vLLM reads its image processor from the model directory, never from tokenizer=:
            # serve it a directory of links to the weights beside the processor we encode with.
            import tempfile

            from ..grpo.vllm_rollout import stage_model_dir

            model_dir = processor_dir = str(stage_model_dir(model_dir, self.tokenizer, self.image_processor,
                                                            tempfile.mkdtemp(prefix="visionr1-eval-vllm-")))
        self.llm = LLM(**vllm_engine_kwargs(model_dir, processor_dir, dtype, settings.max_tokens,
                                            torch.cuda.device_count(), seed))

    def generate(self, items: Sequence[EvalItem], seed: int) -> list[Sample]:
        out: list[Sample] = []
        for start in range(0, len(items), VLLM_CHUNK):
            _check_stop()
            out += self._chunk(items[start:start + VLLM_CHUNK], seed)
        return out

    def _chunk(self, items: Sequence[EvalItem], seed: int) -> list[Sample]:
        from vllm import SamplingParams

        from ..grpo.rollout import SamplingSettings as RolloutSampling
        from ..grpo.vllm_rollout import sampling_kwargs, vllm_requests

        s = self.settings
        prompts, out = encode_items(self.tokenizer, self.image_processor, items)
        if not prompts.kept:
            return out
        params = SamplingParams(**sampling_kwargs(RolloutSampling(1, s.max_tokens, s.temperature, s.top_p),
                                                  seed, self.banned))
        started = time.perf_counter()
        results = self.llm.generate(vllm_requests(prompts), params, use_tqdm=False)
        log.info("vLLM: %d completions in %.1f s", len(results), time.perf_counter() - started)
        for index, result in zip(prompts.kept, results):
            completion = result.outputs[0]
            tokens = list(completion.token_ids)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out[index] = Sample(text, len(tokens), completion.finish_reason == "length")
        return out

    def close(self) -> None:
        from ..bridge.backends.vllm_engine import release_vllm

        self.llm = None
        release_vllm()  # before the next model is loaded


SAMPLERS = ("hf", "vllm")


def make_sampler(backend: str, model_dir: str, processor_dir: str, model_spec, settings: SamplingSettings,
                 seed: int = 0) -> Sampler:
    """The sampler ``eval.backend`` names, loaded with ``model_dir``'s weights."""
    if backend == "hf":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFSampler(model_dir, processor_dir, model_spec.dtype, model_spec.attn_implementation, device, settings)
    if backend == "vllm":
        return VLLMSampler(model_dir, processor_dir, model_spec.dtype, settings, seed)
    raise ValueError(f"unknown eval backend {backend!r}; valid: {', '.join(SAMPLERS)}")
