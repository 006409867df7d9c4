"""torch.distributed set-up from torchrun's environment, and DeepSpeed config generation.

The operator starts multi-node stages through ``torchrun`` with the rendezvous
environment of an Indexed Job (MASTER_ADDR = pod 0 via the headless Service, NODE_RANK
from the completion index); torchrun then sets RANK, WORLD_SIZE and LOCAL_RANK for each
process. A single process (the local demo, tests) runs without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: str
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("VISIONR1_FORCE_CPU") != "1"
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if world == 1:
        return DistEnv(0, 1, 0, device, None)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device, backend)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity for a single process)."""
    if env.backend is None:
        return value
    out = value.detach().clone().to(env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def average_gradients(parameters, env: DistEnv) -> None:
    """All-reduce gradients to their mean over ranks: every rank then takes the same step.

    One flat buffer per call rather than one collective per tensor: on gloo the per-call
    latency dominates for small models.
    """
    if env.backend is None:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(model: torch.nn.Module, env: DistEnv) -> None:
    """Start every rank from rank 0's weights."""
    if env.backend is None:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def barrier(env: DistEnv) -> None:
    if env.backend is not None:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(
    zero_stage: int,
    precision: str,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    world_size: int,
) -> dict[str, Any]:
    """A DeepSpeed config for one training stage (ZeRO-3 for 7B and larger).

    Parameters are partitioned (stage 3) with overlapped communication; the 16-bit
    weights are gathered on save so the committed model loads with ``from_pretrained``.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"deepspeed zero stage must be 1, 2 or 3, got {zero_stage}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto" if zero_stage == 3 else 5e8,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1_000_000,  # our own metrics report progress
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        config["zero_optimization"] |= {
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        }
        # "auto" values are filled in by transformers' HfDeepSpeedConfig from the model's
        # hidden size; without it DeepSpeed wants numbers.
    return config


def parameter_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """(num_tensors, 2) float64: each parameter's sum and sum of squares.

    Cheap to compare across ranks; any rank that stepped differently changes it.
    """
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in model.parameters()]
    return torch.stack(rows).cpu()


def verify_replicas_identical(model: torch.nn.Module, env: DistEnv) -> bool:
    """True when every rank holds exactly rank 0's parameters; raises when they diverged.

    Data-parallel training relies on identical replicas: a rank that drifted (a missed
    all-reduce, nondeterministic kernels applied unevenly) would silently train a
    different model from the one rank 0 commits.
    """
    if env.backend is None:
        return True
    mine = parameter_fingerprint(model)
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine if env.backend == "gloo" else mine.to(env.device))
    diverged = [r for r, other in enumerate(gathered) if not torch.equal(other.cpu(), gathered[0].cpu())]
    if diverged:
        raise RuntimeError(f"ranks {diverged} hold different parameters from rank 0")
    return True


def run_on_ranks(config, train_stage):
    """Run a training stage's ``train_stage(config, env, work, metrics)`` on this rank.

    Joins the process group, makes the work dir, gives rank 0 the metrics endpoint and
    log (other ranks record nothing, so series and lines are not duplicated), and
    always closes both on the way out.
    """
    from .metrics import METRICS_LOG, StageMetrics
    from .runtime import work_dir

    env = init_distributed()
    work = work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    metrics = StageMetrics(config.run, config.stage, config.metrics_port if env.is_main else 0,
                           work / METRICS_LOG if env.is_main else None)
    try:
        return train_stage(config, env, work, metrics.start())
    finally:
        metrics.close()
        shutdown(env)
