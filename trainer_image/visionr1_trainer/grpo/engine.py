"""How a stage's model is run and updated: plain torch (data parallel) or DeepSpeed ZeRO 1-3.

The engine owns the model: every forward pass goes through it, so no call can bypass
what the engine must see (DeepSpeed's ZeRO-3 counts a micro-batch's gradient only for
forwards it ran itself: one called on the raw module kept only the last micro-batch).
Both engines offer the same calls:

    engine(**inputs)                     forward (training or ``torch.no_grad``)
    engine.backward(loss, last=...)      once per micro-batch; ``loss`` already weighted so
                                         the micro-batches' losses sum to the mini-batch's;
                                         ``last`` marks the accumulation boundary
    engine.step() -> grad_norm           once per mini-batch: average over ranks, clip, update
    engine.gathered_for_generation()     a context giving the whole model for a rollout
                                         (ZeRO-3: gathered once, hooks off, given back after)
    engine.iter_full_parameters()        (name, full tensor), one at a time, on every rank
    engine.full_state_dict()             the whole model's weights on rank 0, for saving

``TorchEngine`` all-reduces gradients itself (one flat buffer) and keeps fp32 master
weights when the model is in bf16 or fp16. ``DeepSpeedEngine`` runs ZeRO 1, 2 or 3 (on
GPUs with NCCL, or on CPU ranks with gloo); under ZeRO-3 the model is partitioned while
it loads (``deepspeed.zero.Init`` through transformers' ``HfDeepSpeedConfig``).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..distributed import DistEnv, average_gradients, deepspeed_config, parameter_fingerprint, replicas_identical
from ..runtime import UnusableSetting


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is asked to run; ``field`` names the setting in errors."""

    zero_stage: int
    precision: str  # bf16, fp16, fp32
    micro_batch_size: int
    max_grad_norm: float
    learning_rate: float
    weight_decay: float = 0.0
    activation_checkpointing: bool = False
    field: str = "deepspeedZeroStage"

    @property
    def name(self) -> str:
        return "deepspeed" if self.zero_stage else "torch"


class _Positions:
    """Read-only access to what Qwen-VL's forward leaves behind (its M-RoPE deltas)."""

    _module: torch.nn.Module

    @property
    def computes_own_positions(self) -> bool:
        """Qwen-VL models build their own 3-D positions (they keep ``rope_deltas``)."""
        return hasattr(getattr(self._module, "model", None), "rope_deltas")

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """(B, 1) per-row offset of text positions after images, from the last prefill."""
        return getattr(getattr(self._module, "model", None), "rope_deltas", None)

    @property
    def name_or_path(self) -> str:
        """Where the weights were loaded from (a rollout engine reads its config there)."""
        return self._module.name_or_path

    @property
    def dtype(self) -> torch.dtype:
        return self._module.dtype

    def parameter_counts(self) -> dict[str, int]:
        """``trainableParameters`` and ``loraParameters`` (0 without LoRA), for the start event.
        Under ZeRO-3 a rank holds a partition: counts are read from ``ds_numel`` there."""
        trainable = lora = 0
        for name, param in self._module.named_parameters():
            numel = getattr(param, "ds_numel", param.numel())
            trainable += numel if param.requires_grad else 0
            lora += numel if ".lora_A." in name or ".lora_B." in name else 0
        return {"trainableParameters": trainable, "loraParameters": lora}

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (LoRA's saving helpers read its adapter layers and trainable names)."""
        return self._module

    def save_pretrained(self, directory, state_dict: dict | None = None, **kwargs) -> None:
        """Hugging Face format; ``state_dict`` is ``full_state_dict()`` (required when partitioned)."""
        self._module.save_pretrained(directory, state_dict=state_dict, **kwargs)


class TorchEngine(_Positions):
    """Data parallelism by gradient all-reduce; fp32 master weights for 16-bit models."""

    def __init__(self, model: torch.nn.Module, env: DistEnv, spec: EngineSpec):
        self._module, self.env, self.spec = model, env, spec
        self._params = [p for p in model.parameters() if p.requires_grad]
        low_precision = any(p.dtype != torch.float32 for p in self._params)
        # 16-bit weights under AdamW at 1e-6 mostly round back to themselves: the update
        # is applied to fp32 copies, and the model gets their rounded values.
        self._masters = [p.detach().float().clone() for p in self._params] if low_precision else None
        trained = self._masters if self._masters is not None else self._params
        self.optimizer = torch.optim.AdamW(trained, lr=spec.learning_rate, weight_decay=spec.weight_decay)

    def __call__(self, **inputs):
        return self._module(**inputs)

    forward = __call__

    def train(self, mode: bool = True) -> None:
        self._module.train(mode)

    def zero_grad(self) -> None:
        self._module.zero_grad(set_to_none=True)
        if self._masters is not None:
            for master in self._masters:
                master.grad = None

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> torch.Tensor:
        if self._masters is None:
            trained = self._params
        else:  # gradients to fp32 first: the all-reduce and the clip then see full precision
            for param, master in zip(self._params, self._masters):
                master.grad = param.grad.float() if param.grad is not None else None
            trained = self._masters
        average_gradients(trained, self.env)  # identical gradients -> identical weights on every rank
        norm = torch.nn.utils.clip_grad_norm_(trained, self.spec.max_grad_norm)
        self.optimizer.step()
        if self._masters is not None:
            with torch.no_grad():
                for param, master in zip(self._params, self._masters):
                    param.copy_(master)
        return norm.detach().cpu()

    @contextmanager
    def gathered_for_generation(self) -> Iterator[torch.nn.Module]:
        was_training = self._module.training
        self._module.eval()
        try:
            yield self._module
        finally:
            self._module.train(was_training)

    def iter_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self._module.named_parameters():
            yield name, param.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._module.state_dict()

    def broadcast_from_rank0(self) -> None:
        """Start every rank from rank 0's weights (and masters)."""
        if self.env.backend is None:
            return
        for tensor in list(self._module.parameters()) + list(self._module.buffers()):
            dist.broadcast(tensor.data, src=0)
        if self._masters is not None:
            for param, master in zip(self._params, self._masters):
                master.copy_(param.detach().float())

    # Replicated: rank 0's copy is every rank's.
    optimizer_state_replicated = True

    def optimizer_state(self) -> dict[str, Any]:
        """Adam moments and (16-bit models) the fp32 master weights; plain tensors only."""
        return {"optimizer": self.optimizer.state_dict(), "masters": self._masters}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self._masters is not None and state.get("masters") is not None:
            with torch.no_grad():
                for param, master, saved in zip(self._params, self._masters, state["masters"]):
                    master.copy_(saved)
                    param.copy_(saved)

    def verify_replicas_identical(self) -> bool | None:
        """True when every rank holds rank 0's weights (raises otherwise)."""
        return replicas_identical(parameter_fingerprint(self._module.parameters()), self.env)

    def describe(self) -> dict[str, Any]:
        return {"engine": "torch", "zeroStage": 0, "precision": self.spec.precision,
                "worldSize": self.env.world_size, "masterWeights": self._masters is not None,
                "activationCheckpointing": self.spec.activation_checkpointing, **self.parameter_counts()}


class DeepSpeedEngine(_Positions):
    """ZeRO-partitioned training through DeepSpeed's own engine (forward, backward, step)."""

    optimizer_state_replicated = False  # each rank holds its own partition

    def __init__(self, ds_engine, env: DistEnv, spec: EngineSpec, keepalive: Any = None):
        self._ds, self.env, self.spec = ds_engine, env, spec
        self._module = ds_engine.module
        self._keepalive = keepalive  # HfDeepSpeedConfig: transformers reads ZeRO-3 from it while alive

    def __call__(self, **inputs):
        return self._ds(**inputs)

    forward = __call__

    def train(self, mode: bool = True) -> None:
        self._ds.train(mode)

    def zero_grad(self) -> None:
        self._ds.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # The boundary must be set before the backward that closes the accumulation:
        # ZeRO 1/2 reduce (and ZeRO-3 finalises) the partitioned gradients there.
        self._ds.set_gradient_accumulation_boundary(last)
        # The losses arrive weighted to sum to the mini-batch loss: DeepSpeed must not
        # divide them again by its accumulation count.
        self._ds.backward(loss, scale_wrt_gas=False)

    def set_lr(self, lr: float) -> None:
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> torch.Tensor:
        self._ds.set_gradient_accumulation_boundary(True)
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    @property
    def _zero3(self) -> bool:
        return self.spec.zero_stage == 3

    @contextmanager
    def gathered_for_generation(self) -> Iterator[torch.nn.Module]:
        """The whole model for a rollout. Under ZeRO-3 its weights are gathered once and its
        hooks removed, so the per-token forwards are local (no collective, no re-gather)
        and ranks that finish at different lengths cannot hang each other."""
        was_training = self._module.training
        self._module.eval()
        try:
            if self._zero3:
                from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

                with unwrap_model_for_generation(self._ds):
                    yield self._module
            else:
                yield self._module
        finally:
            self._module.train(was_training)

    def iter_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter whole, in ``named_parameters`` order, on every rank.

        Under ZeRO-3 a collective per parameter: every rank must iterate in step. The
        tensor is valid until the next one is asked for (its gather is then released):
        copy it if it must be kept.
        """
        if not self._zero3:
            for name, param in self._module.named_parameters():
                yield name, param.detach()
            return
        import deepspeed

        for name, param in self._module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict on rank 0 (CPU copies under ZeRO-3); ``{}`` on other ranks.

        A collective under ZeRO-3: every rank calls it. Tied weights stay one tensor.
        """
        if not self._zero3:
            return self._module.state_dict() if self.env.is_main else {}
        full: dict[int, torch.Tensor] = {}
        params = dict(self._module.named_parameters())
        for name, tensor in self.iter_full_parameters():
            if self.env.is_main:
                full[id(params[name])] = tensor.detach().to("cpu", copy=True)
        if not self.env.is_main:
            return {}
        out = {}
        for key, value in self._module.state_dict(keep_vars=True).items():
            out[key] = full.get(id(value), value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return out

    def broadcast_from_rank0(self) -> None:
        return None  # DeepSpeed broadcasts (ZeRO 1/2) or partitions (ZeRO-3) at initialisation

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's ZeRO partition: fp32 master weights and Adam moments."""
        return {"zero": self._ds.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        # A list indexed by data-parallel rank is what DeepSpeed's loaders take; only
        # this rank's entry is read. fp32 masters come from the shard, not from the
        # 16-bit weights (which would lose the low bits of every update).
        shards = [state["zero"]] * self.env.world_size
        self._ds.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)

    def verify_replicas_identical(self) -> bool | None:
        """ZeRO 1/2 replicate the 16-bit weights: compared. ZeRO-3 holds no replicas
        (each rank has its own partition), so there is nothing to compare: None."""
        if self._zero3:
            return None
        return replicas_identical(parameter_fingerprint(self._module.parameters()), self.env)

    def describe(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "zeroStage": self.spec.zero_stage, "precision": self.spec.precision,
                "worldSize": self.env.world_size, "activationCheckpointing": self.spec.activation_checkpointing,
                **self.parameter_counts()}


class FrozenModel(_Positions):
    """A model that never trains (the KL reference): forward only, partitioned under ZeRO-3."""

    def __init__(self, module: torch.nn.Module, ds_engine=None, keepalive: Any = None):
        self._module, self._ds, self._keepalive = module, ds_engine, keepalive

    def __call__(self, **inputs):
        return (self._ds or self._module)(**inputs)


# --- building engines -------------------------------------------------------------------------


def import_deepspeed(env: DistEnv, spec: EngineSpec):
    """DeepSpeed, with its CPU accelerator on CPU ranks; an unusable setting if it cannot run."""
    if not env.device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the only switch a CPU run needs
    try:
        import deepspeed
    except Exception as exc:  # not installed, or no accelerator it supports
        raise UnusableSetting(
            f"{spec.field}: ZeRO stage {spec.zero_stage} needs DeepSpeed, which cannot run here "
            f"({type(exc).__name__}: {exc}); install deepspeed or set {spec.field}: 0"
        ) from None
    _ensure_process_group()
    # DeepSpeed's communication layer adopts the torch process group already joined
    # (gloo on CPU, NCCL on GPU); without it DeepSpeed would count a world of one.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one process: a 1-rank gloo group then."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(minutes=60))


def engine_config(spec: EngineSpec, env: DistEnv, hidden_size: int, train: bool = True) -> dict[str, Any]:
    """The DeepSpeed config of ``spec`` (inference: no optimizer, ZeRO-3 or nothing)."""
    return deepspeed_config(spec.zero_stage, spec.precision, spec.micro_batch_size, spec.max_grad_norm,
                            env.world_size, hidden_size, train=train, overlap_comm=env.device.startswith("cuda"),
                            cpu_ranks=not env.device.startswith("cuda"))


def _hidden_size(load_config: Callable[[], Any]) -> int:
    config = load_config()
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "hidden_size", 1024))


def _partitioned_loading(config: dict[str, Any]):
    """Under ZeRO-3, ``from_pretrained`` partitions each weight as it loads (zero.Init)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def make_engine(load_model: Callable[[], torch.nn.Module], load_config: Callable[[], Any], env: DistEnv,
                spec: EngineSpec):
    """Load the model through the engine that ``spec`` asks for, and return the engine.

    ZeRO 1-3 run DeepSpeed (GPU or CPU); where DeepSpeed cannot run the stage fails
    with ``UnusableSetting`` (exit 2) naming the field; it never falls back silently.
    """
    if spec.precision == "fp16" and not spec.zero_stage:
        raise UnusableSetting(f"precision fp16 needs DeepSpeed's loss scaling ({spec.field} > 0); use bf16 or fp32")
    if not spec.zero_stage:
        model = load_model()
        _activation_checkpointing(model, spec)
        return TorchEngine(model, env, spec)
    deepspeed = import_deepspeed(env, spec)
    config = engine_config(spec, env, _hidden_size(load_config))
    keepalive = _partitioned_loading(config) if spec.zero_stage == 3 else None
    model = load_model()
    _activation_checkpointing(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return DeepSpeedEngine(ds_engine, env, spec, keepalive)


def make_reference(load_model: Callable[[], torch.nn.Module], load_config: Callable[[], Any], env: DistEnv,
                   spec: EngineSpec) -> FrozenModel:
    """The frozen KL reference: partitioned like the policy under ZeRO-3, a plain module otherwise."""
    if spec.zero_stage != 3:
        model = load_model()
        return FrozenModel(model.eval().requires_grad_(False))
    deepspeed = import_deepspeed(env, spec)
    config = engine_config(spec, env, _hidden_size(load_config), train=False)
    keepalive = _partitioned_loading(config)
    model = load_model().eval().requires_grad_(False)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    ds_engine.eval()
    return FrozenModel(model, ds_engine, keepalive)


def _activation_checkpointing(model: torch.nn.Module, spec: EngineSpec) -> None:
    """Recompute each layer's activations in backward instead of keeping them (long sequences)."""
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
