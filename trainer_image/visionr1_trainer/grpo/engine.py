"""How gradients become updates: plain torch (CPU, single GPU, DDP-style) or DeepSpeed ZeRO.

The GRPO loop calls the same four methods whichever engine runs:

    engine.backward(loss)        once per micro-batch (loss already weighted)
    engine.step() -> grad_norm   once per mini-batch: average over ranks, clip, update
    engine.module                what to call forward on and generate with
    engine.full_state_dict()     the whole model's weights (rank 0), for saving and vLLM

``TorchEngine`` all-reduces gradients itself (one flat buffer), which on gloo and for
models that fit one device is all that data parallelism needs. ``DeepSpeedEngine``
partitions parameters, gradients and optimizer state (ZeRO-3) for 7B and larger.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import DistEnv, average_gradients, deepspeed_config


class TorchEngine:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, max_grad_norm: float):
        self.module, self.optimizer, self.env, self.max_grad_norm = model, optimizer, env, max_grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad]
        average_gradients(params, self.env)  # identical gradients -> identical weights on every rank
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        return norm.detach().cpu()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    @property
    def checkpointable_optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer


class DeepSpeedEngine:
    """ZeRO-partitioned training (GPU). Needs ``deepspeed`` (the trainer image's gpu extra).

    Resuming restores weights, step and RNG; ZeRO's partitioned Adam moments are not in
    our checkpoints (they would need every rank to upload its shard), so they restart.
    """

    def __init__(self, model: torch.nn.Module, lr: float, env: DistEnv, zero_stage: int,
                 precision: str, micro_batch_size: int, max_grad_norm: float):
        import deepspeed

        self.env = env
        config = deepspeed_config(zero_stage, precision, micro_batch_size, 1, max_grad_norm, env.world_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self._boundary = False

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        # Micro-batch losses arrive already weighted to sum to the mini-batch loss, so
        # DeepSpeed must not divide by its own accumulation count; the boundary is
        # ours (set in step), not a fixed number of micro-batches.
        self.engine.set_gradient_accumulation_boundary(False)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # ZeRO-3 holds a shard of each parameter per rank; gather the 16-bit weights.
        return self.engine._zero3_consolidated_16bit_state_dict() or {}

    @property
    def checkpointable_optimizer(self) -> None:
        return None


def make_engine(model, env: DistEnv, lr: float, zero_stage: int, precision: str, micro_batch_size: int,
                max_grad_norm: float) -> Any:
    """DeepSpeed when a ZeRO stage is asked for and a GPU is there; plain torch otherwise."""
    if zero_stage and env.device.startswith("cuda"):
        return DeepSpeedEngine(model, lr, env, zero_stage, precision, micro_batch_size, max_grad_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return TorchEngine(model, optimizer, env, max_grad_norm)
