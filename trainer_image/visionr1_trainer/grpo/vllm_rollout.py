"""Rollouts with a colocated vLLM engine per rank, refreshed from the policy once per rollout.

The layout TRL's ``vllm_mode="colocate"`` and verl's hybrid engine use under torchrun:

- **One engine per rank, on that rank's GPU.** ``distributed_executor_backend=
  "external_launcher"`` makes vLLM build a single in-process worker on ``cuda:LOCAL_RANK``
  that joins the process group torchrun started (vLLM's ``ExecutorWithExternalLauncher``
  reads ``RANK``/``LOCAL_RANK`` and uses ``env://``). With tensor parallel size 1 every
  rank is its own data-parallel replica and samples its own share of the prompts.
  Without it, every rank's engine lands on GPU 0. Models whose weights do not fit one
  GPU's share (32B, 72B) take ``vllmTensorParallelSize`` consecutive ranks per engine.
- **Weights pushed at the start of every rollout, one parameter at a time.** The engine's
  ``iter_full_parameters()`` yields ``(name, full tensor)`` on every rank (a collective
  under ZeRO-3: each rank gathers one parameter, hands it to its own vLLM, frees it), so
  no rank ever holds a second full copy and nothing goes through the CPU.
- **Sleep level 2 between rollouts.** ``Worker.sleep(level=1)`` copies every weight to CPU
  and ``wake_up`` copies it back (vLLM ``v1/worker/gpu_worker.py``, ``CuMemAllocator.sleep``
  with ``offload_tags=("weights",)``): two full-model transfers per step for weights we
  overwrite anyway. Level 2 discards weights and KV cache (only named buffers are kept on
  CPU and restored on wake), so after ``wake_up(tags=["weights"])`` the weight memory holds
  garbage until the push fills it. The push checks, as vLLM's own ``DefaultModelLoader``
  does, that every vLLM parameter was written; a rollout with discarded weights and no
  policy to refill them raises instead of sampling garbage (vLLM issue 29341).
- **A fresh seed per request and step**, from (stage seed, step, rank, request index):
  reruns reproduce, no two steps replay one random stream.
- **The training image processor.** vLLM loads its HF processor from the *model* directory
  (``cached_processor_from_config(model_config.model, ...)``), not from ``tokenizer=``.
  The engine is pointed at a directory of links to the model files plus the tokenizer and
  image processor the trainer uses, saved there, so both sides make the same patches.
- **Stop tokens the completion mask knows.** vLLM stops on the tokenizer's EOS and on every
  ``eos_token_id`` of ``generation_config.json`` (Qwen2.5-VL lists ``<|endoftext|>``, the pad
  token, too); the completion mask knows only the tokenizer's EOS. The engine is told to
  stop on exactly that id (``stop_kwargs``), as the HF sampler does.

Everything but ``VLLMRollout`` is pure and unit-tested on CPU without importing vLLM
(tests/test_vllm_rollout.py); the engine itself runs only where a GPU is lent
(``make gpu-smoke``, tests/test_vllm_gpu.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..models.lora import lora_scaling, merged_parameters
from ..models.vlm import EncodedPrompts
from .rollout import Rollout, SamplingSettings, finish_rollout, vision_token_ids

log = logging.getLogger("visionr1.grpo.vllm")

# Images per prompt vLLM reserves encoder memory for (geometry problems carry one or two).
MAX_IMAGES_PER_PROMPT = 4
SEED_SPACE = 2**31  # vLLM seeds a torch.Generator per request; stay in a range every backend takes
# Prefixes that wrappers add to parameter names and that the HF checkpoint (and so vLLM's
# name mapper) does not have: DeepSpeed/DDP ``module.``, torch.compile ``_orig_mod.``,
# activation-checkpoint wrappers ``_checkpoint_wrapped_module.``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


# --- seeds ------------------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one rank's rollout of one step, in ``[0, 2**31)``.

    A hash, so nearby (step, rank) pairs give unrelated streams; a function of its
    arguments only, so a rerun (or a resume at ``step``) draws the same samples.
    """
    digest = hashlib.blake2b(f"visionr1-rollout:{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_SPACE


def request_seeds(seed: int, step: int, rank: int, num_requests: int) -> list[int]:
    """One seed per request of a rollout: consecutive from ``step_seed``, so never two alike in a step.

    vLLM keeps one generator per request seeded with its ``SamplingParams.seed`` (and seeds
    the children of an ``n > 1`` request ``seed + index``): requests sharing a seed would
    draw the same uniforms. We send one request per sample (``n = 1``), each its own seed.
    """
    base = step_seed(seed, step, rank)
    return [(base + i) % SEED_SPACE for i in range(num_requests)]


# --- tensor-parallel groups ---------------------------------------------------------------------


def tensor_parallel_groups(world_size: int, tp: int, local_world_size: int) -> list[list[int]]:
    """The ranks that share one vLLM engine: ``tp`` consecutive ranks, within one node.

    vLLM's external launcher builds its tensor-parallel groups the same way (consecutive
    ranks of torchrun's world). Raises ``ValueError`` naming the field when they cannot
    split evenly or would span nodes.
    """
    if tp < 1 or world_size % tp or local_world_size % tp:
        raise ValueError(f"vllmTensorParallelSize {tp} must divide the ranks ({world_size}) and the GPUs "
                         f"per node ({local_world_size})")
    return [list(range(start, start + tp)) for start in range(0, world_size, tp)]


def share_slices(counts: list[int]) -> list[slice]:
    """Where each member's requests lie in the group's gathered list (members in rank order)."""
    out, start = [], 0
    for count in counts:
        out.append(slice(start, start + count))
        start += count
    return out


# --- requests and sampling ----------------------------------------------------------------------


def vllm_requests(prompts: EncodedPrompts, copies: int = 1) -> list[dict[str, Any]]:
    """vLLM prompt dicts, prompt-major: each kept prompt's chat text and images, ``copies`` times.

    With prefix caching (vLLM's default) the copies of one prompt share its KV blocks, and
    the multimodal encoder cache runs each image once.
    """
    out = []
    for text, images in zip(prompts.chat_texts, prompts.images):
        request: dict[str, Any] = {"prompt": text}
        if images:
            request["multi_modal_data"] = {"image": list(images)}
        out.extend(dict(request) for _ in range(copies))
    return out


def stop_kwargs(eos_token_id: int) -> dict[str, Any]:
    """``SamplingParams`` fields that make vLLM stop on ``eos_token_id`` and nothing else.

    ``ignore_eos=True`` turns off vLLM's own EOS check and keeps ``generation_config``'s
    extra EOS ids out of ``stop_token_ids`` (``SamplingParams.update_from_generation_config``
    adds them only when ``ignore_eos`` is False); ``stop_token_ids=[eos]`` then stops on the
    one id ``completion_mask`` ends a completion at. The stop token stays in the output.
    """
    return {"ignore_eos": True, "stop_token_ids": [int(eos_token_id)]}


def sampling_kwargs(sampling: SamplingSettings, seed: int | None, banned: list[int],
                    eos_token_id: int | None = None, n: int | None = None) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments equivalent to the HF backend's sampling.

    ``n`` defaults to ``sampling.num_generations`` (one request per prompt); the rollout
    passes ``n=1`` with one request per sample. With ``eos_token_id`` vLLM stops only there.
    """
    kwargs: dict[str, Any] = {
        "n": sampling.num_generations if n is None else n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": -1,
        "max_tokens": sampling.max_completion_length,
        "min_tokens": 1,
        "seed": seed,
        "detokenize": False,
    }
    if eos_token_id is not None:
        kwargs.update(stop_kwargs(eos_token_id))
    if banned:
        # The same guard as HF's bad_words_ids: never sample an image slot token.
        kwargs["logit_bias"] = {tid: -100.0 for tid in banned}
    return kwargs


def rollout_sampling_kwargs(sampling: SamplingSettings, seeds: list[int], banned: list[int],
                            eos_token_id: int) -> list[dict[str, Any]]:
    """One ``SamplingParams`` argument dict per request (``n = 1`` each, its own seed)."""
    return [sampling_kwargs(sampling, s, banned, eos_token_id, n=1) for s in seeds]


def pad_completions(token_lists: Iterable[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad completion token lists into ``(B, T)``."""
    rows = [list(t) for t in token_lists]
    width = max((len(r) for r in rows), default=1) or 1
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


# --- the engine ---------------------------------------------------------------------------------


def engine_kwargs(model_dir: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                  seed: int, max_images: int = MAX_IMAGES_PER_PROMPT, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """``vllm.LLM`` arguments for one rank's colocated engine.

    ``model_dir`` holds the weights *and* the processor vLLM will use (``stage_model_dir``).
    ``gpu_memory_utilization`` is this engine's share of its GPU (weights + KV cache), which
    several ranks' engines may split on one device.
    """
    return {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        # tp > 1: consecutive ranks form one engine, each rank its shard of it.
        "tensor_parallel_size": tensor_parallel_size,
        # One in-process worker on cuda:LOCAL_RANK joining torchrun's process group.
        "distributed_executor_backend": "external_launcher",
        "enable_sleep_mode": True,
        "seed": seed,
        "limit_mm_per_prompt": {"image": max_images},
        "trust_remote_code": False,
    }


def launcher_env(rank: int, local_rank: int, world_size: int, environ: Mapping[str, str],
                 port: int) -> dict[str, str]:
    """Variables to set so vLLM's external launcher finds the rank it runs on.

    torchrun sets them all; a single process (the local executor) sets none, and vLLM then
    initialises a one-rank group over ``env://`` on ``port``. Returns only the variables
    missing from ``environ``: what torchrun set is never overridden.
    """
    wanted = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return {k: v for k, v in wanted.items() if k not in environ}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Files a tokenizer or image processor writes with save_pretrained; in the staged directory
# they come from the trainer's objects, never from the model directory.
PROCESSOR_FILES = frozenset({
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
    "chat_template.jinja", "tokenizer.model",
})


def stage_model_dir(model_dir: str | Path, tokenizer, image_processor, dest: str | Path) -> Path:
    """A directory vLLM loads the model from that carries the *trainer's* tokenizer and processor.

    Every other file of ``model_dir`` (weights, config, generation config, video processor) is
    a symbolic link, so this costs no copy of the weights.
    """
    model_dir, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    image_processor.save_pretrained(dest)
    written = {p.name for p in dest.iterdir()}
    for item in model_dir.iterdir():
        if item.name in written or item.name in PROCESSOR_FILES:
            continue
        (dest / item.name).symlink_to(item.resolve())
    return dest


def policy_source(policy, fallback: str) -> str:
    """Where the policy's weights were loaded from: a checkpoint directory after a resume.

    ``LogprobModel`` (grpo/logprob_head.py) keeps the Hugging Face model as ``hf``.
    """
    model = getattr(policy, "hf", policy)
    return getattr(model, "name_or_path", None) or fallback


def policy_dtype(policy) -> torch.dtype:
    """The dtype vLLM runs in: the policy's (an engine's ``dtype``, or its first parameter's)."""
    dtype = getattr(policy, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(policy.parameters()).dtype


def local_model_dir(source: str) -> str:
    """``source`` as a local directory: itself, or its snapshot in the Hugging Face cache."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:  # training loaded it already, so the cache has what vLLM reads
        return snapshot_download(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - any cache miss: fetch it as from_pretrained would
        return snapshot_download(source)


# --- weights ------------------------------------------------------------------------------------


def vllm_weight_name(name: str) -> str:
    """A training parameter's name as the Hugging Face checkpoint spells it.

    vLLM's Qwen2.5-VL ``load_weights`` maps checkpoint names itself (both the
    ``model.language_model.*``/``model.visual.*`` layout of transformers 5 and the older
    ``model.*``/``visual.*``); what it cannot know are wrapper prefixes.
    """
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def vllm_weights(parameters: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor in vLLM's dtype)``, lazily: one parameter alive at a time."""
    for name, tensor in parameters:
        yield vllm_weight_name(name), tensor.detach().to(dtype)


def unloaded_parameters(expected: Iterable[str], loaded: Iterable[str]) -> list[str]:
    """vLLM parameters no pushed weight wrote: after a level-2 sleep they hold garbage."""
    return sorted(set(expected) - set(loaded))


def push_weights(worker, parameters: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[str]:
    """Load ``parameters`` into one vLLM worker's model, one at a time (runs on the worker).

    Returns the vLLM parameters left unwritten (empty when the model's ``load_weights``
    does not report what it loaded). The iterator is consumed to its end on every rank
    even when something is missing: under ZeRO-3 each item is a collective.
    """
    model = worker.model_runner.model
    expected = [name for name, _ in model.named_parameters()]
    loaded: set[str] = set()
    reported = True
    for name, tensor in vllm_weights(parameters, dtype):
        got = model.load_weights(weights=[(name, tensor)])
        del tensor  # the gathered copy goes now, not at the end of the loop
        if got is None:
            reported = False
        else:
            loaded.update(got)
    return unloaded_parameters(expected, loaded) if reported else []


# --- the rollout backend --------------------------------------------------------------------------


class VLLMRollout:
    """One colocated vLLM engine on this rank's GPU.

    ``policy`` is the training engine (``grpo/engine.py``: ``iter_full_parameters``,
    ``name_or_path``, ``dtype``) or, in older call sites, the model itself. Weight states:
    ``disk`` (the starting weights vLLM read itself) and ``discarded`` (after a level-2
    sleep). With an engine known (given here or by ``sync_weights``), every ``generate``
    pushes its weights first: the transfer happens exactly once per rollout however often
    ``sync_weights`` is called.

    With ``vllmTensorParallelSize`` tp > 1, tp consecutive ranks share one engine (TRL's
    colocate mode does the same): each gathers the group's requests, all of them run the
    same requests with the same seeds (vLLM's external launcher needs them in lockstep),
    and each keeps its own share of the outputs.
    """

    def __init__(self, policy, tokenizer, env, config, image_processor=None, llm=None, gather=None):
        self.tokenizer, self.env = tokenizer, env
        self.seed = config.grpo.seed
        self.banned = vision_token_ids(tokenizer)
        self.dtype = policy_dtype(policy)
        self.source = policy if hasattr(policy, "iter_full_parameters") else None
        self.calls = 0
        self.tp = int(getattr(config.grpo, "vllm_tensor_parallel_size", 1))
        self.seed_rank, self.member = divmod(env.rank, self.tp)  # the engine's index, this rank's place in it
        self.gather = gather or (self._group_gather(env) if self.tp > 1 else None)
        self.llm = llm if llm is not None else self._make_llm(policy, tokenizer, env, config, image_processor)
        # Free the KV cache (and the weights) until the first rollout. With an engine to copy
        # from, the first rollout pushes them like every other: discard (level 2). Without,
        # the starting weights are the only copy: offload them once (level 1).
        self.weights = "discarded" if self.source is not None else "disk"
        self.llm.sleep(level=2 if self.source is not None else 1)

    def _group_gather(self, env):
        """``gather(obj)``: every member's ``obj`` of this rank's tensor-parallel group, in rank order."""
        import torch.distributed as dist

        from ..runtime import UnusableSetting

        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        try:
            groups = tensor_parallel_groups(env.world_size, self.tp, local)
        except ValueError as exc:
            raise UnusableSetting(str(exc)) from None
        mine, _ = dist.new_subgroups_by_enumeration(groups)  # collective: every rank, same order

        def gather(obj):
            out = [None] * self.tp
            dist.all_gather_object(out, obj, group=mine)
            return out

        return gather

    def _make_llm(self, policy, tokenizer, env, config, image_processor):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # external launcher: in-process worker
        os.environ.update(launcher_env(env.rank, env.local_rank, env.world_size, os.environ, free_port()))
        from vllm import LLM

        from ..models.loading import load_processor_parts

        source = local_model_dir(policy_source(policy, config.model.name))
        if image_processor is None:  # the processor training uses: the same source load_models reads
            tokenizer, image_processor = load_processor_parts(config.model.processor or source)
        staged = stage_model_dir(source, tokenizer, image_processor,
                                 tempfile.mkdtemp(prefix=f"visionr1-vllm-rank{env.rank}-"))
        kwargs = engine_kwargs(
            str(staged), str(self.dtype).replace("torch.", ""),
            config.grpo.max_prompt_length + config.ptst.max_completion_length,
            config.grpo.vllm_gpu_memory_utilization, step_seed(self.seed, -1, self.seed_rank),
            tensor_parallel_size=self.tp,
        )
        log.info("rank %d: vLLM engine on cuda:%d (%.0f%% of its memory)", env.rank, env.local_rank,
                 100 * kwargs["gpu_memory_utilization"])
        return LLM(**kwargs)

    def sync_weights(self, engine) -> None:
        """Name the policy the next rollout copies its weights from (cheap; no transfer here).

        ``engine.iter_full_parameters()`` runs at the start of the next ``generate`` on every
        rank in the same order (it is a collective under ZeRO-3).
        """
        self.source = engine

    def generate(self, prompts: EncodedPrompts, images_per_prompt: list[int], sampling: SamplingSettings,
                 step: int | None = None) -> Rollout:
        """``num_generations`` completions per prompt, prompt-major. ``step`` picks the seeds
        (default: the count of earlier calls, which a resumed stage must override)."""
        from vllm import SamplingParams

        step = self.calls if step is None else step
        self.calls = step + 1
        requests = vllm_requests(prompts, copies=sampling.num_generations)
        mine = slice(0, len(requests))
        if self.gather is not None:  # tp > 1: the engine runs the whole group's requests
            members = self.gather(requests)
            mine = share_slices([len(m) for m in members])[self.member]
            requests = [r for member in members for r in member]
        seeds = request_seeds(self.seed, step, self.seed_rank, len(requests))  # the same on the whole group
        params = [SamplingParams(**kw) for kw in
                  rollout_sampling_kwargs(sampling, seeds, self.banned, self.tokenizer.eos_token_id)]
        start = time.perf_counter()
        self._wake_with_current_weights()
        try:
            self.llm.wake_up(tags=["kv_cache"])
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self.llm.sleep(level=2)  # weights are overwritten at the next rollout: nothing to keep
            self.weights = "discarded"
        tokens = [list(out.outputs[0].token_ids) for out in outputs[mine]]
        ids = pad_completions(tokens, self.tokenizer.pad_token_id)
        return finish_rollout(ids, self.tokenizer, sampling.max_completion_length, time.perf_counter() - start)

    def _wake_with_current_weights(self) -> None:
        if self.source is None and self.weights == "discarded":
            raise RuntimeError("vLLM's weights were discarded after the last rollout and no policy was "
                               "given to refill them: call sync_weights(engine) before generate")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # training's cached blocks are memory vLLM's pool cannot use
        self.llm.wake_up(tags=["weights"])
        if self.source is None:
            return  # the starting weights, restored from the one level-1 offload
        parameters = self.source.iter_full_parameters()
        scaling = lora_scaling(self.source.module) if hasattr(self.source, "module") else {}
        if scaling:  # LoRA: vLLM holds the plain model; each adapter is merged into its layer
            parameters = merged_parameters(parameters, scaling)
        missing = self.llm.collective_rpc(lambda worker: push_weights(worker, parameters, self.dtype))[0]
        self.llm.reset_prefix_cache()  # cached prefixes were computed by the old weights
        if missing:
            raise RuntimeError(f"the policy has no weights for {len(missing)} vLLM parameters "
                               f"(first: {', '.join(missing[:5])}); they would sample garbage")
