"""torch.distributed set-up from torchrun's environment, and DeepSpeed config generation.

The operator starts multi-node stages through ``torchrun`` with the rendezvous
environment of an Indexed Job (MASTER_ADDR = pod 0 via the headless Service, NODE_RANK
from the completion index); torchrun then sets RANK, WORLD_SIZE and LOCAL_RANK for each
process. A single process (the local demo, tests) runs without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

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


def init_distributed(timeout_minutes: float = 60.0) -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), if any.

    ``timeout_minutes`` bounds every collective: ranks wait that long at a barrier while
    rank 0 uploads a checkpoint, so it must outlast the largest upload (NCCL's default
    10 minutes does not for a 7B checkpoint).
    """
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
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world, local_rank, device, backend)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity for a single process)."""
    if env.backend is None:
        return value
    out = value.detach().clone().to(env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def all_reduce_max(value: int, env: DistEnv) -> int:
    """The largest of an integer over ranks (itself for a single process)."""
    if env.backend is None:
        return value
    out = torch.tensor([value], dtype=torch.long, device=env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


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


# DeepSpeed's own default bucket sizes (elements), used on CPU ranks (deepspeed_config).
CPU_REDUCE_BUCKET = 500_000_000
CPU_PREFETCH_BUCKET = 50_000_000


def deepspeed_config(
    zero_stage: int,
    precision: str,
    micro_batch_size: int,
    max_grad_norm: float,
    world_size: int,
    hidden_size: int,
    train: bool = True,
    overlap_comm: bool = False,
    cpu_ranks: bool = False,
) -> dict[str, Any]:
    """A DeepSpeed config for one training stage (ZeRO-3 for 7B and larger), or for a
    frozen model (``train=False``: the KL reference, partitioned under ZeRO-3 only).

    The caller owns gradient accumulation: it weights each micro-batch's loss and marks
    the boundary (``set_gradient_accumulation_boundary``), so DeepSpeed's own count is 1
    and ``train_batch_size`` is only its bookkeeping. The ZeRO-3 bucket sizes are the
    numbers transformers' integration derives from the hidden size for "auto"
    (DeepSpeed itself accepts no "auto"). bf16 accumulates gradients in fp32 and keeps
    fp32 master weights and optimizer state in the ZeRO optimizer.

    ``cpu_ranks`` (gloo): the reduce and prefetch buckets are DeepSpeed's own defaults
    (``CPU_REDUCE_BUCKET``, ``CPU_PREFETCH_BUCKET`` elements) rather than the hidden-size
    ones, which are sized for GPUs: over gloo each collective costs about a millisecond
    however small, and a hidden size of 64 made 46 reduce-scatters a backward (DeepSpeed's
    CPU accelerator also starts a ``numactl`` process for each). The persistence
    threshold stays: it decides what is partitioned at all.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"deepspeed zero stage must be 1, 2 or 3, got {zero_stage}")
    stage = zero_stage if train or zero_stage == 3 else 0
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": overlap_comm,  # GPUs: reduce on a side stream; CPU ranks have none
            "contiguous_gradients": True,
            "reduce_bucket_size": hidden_size * hidden_size if stage == 3 and not cpu_ranks else CPU_REDUCE_BUCKET,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1_000_000,  # our own metrics report progress
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if stage == 3:
        config["zero_optimization"] |= {
            "stage3_gather_16bit_weights_on_model_save": False,  # we gather per parameter ourselves
            "stage3_prefetch_bucket_size": CPU_PREFETCH_BUCKET if cpu_ranks else int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
    return config


def parameter_fingerprint(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """(num_tensors, 2) float64: each tensor's sum and sum of squares.

    Cheap to compare across ranks; any rank that stepped differently changes it.
    """
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in parameters]
    return torch.stack(rows).cpu()


def replicas_identical(mine: torch.Tensor, env: DistEnv) -> bool:
    """True when every rank's fingerprint equals rank 0's; raises when they diverged.

    Data-parallel training relies on identical replicas: a rank that drifted (a missed
    all-reduce, nondeterministic kernels applied unevenly) would silently train a
    different model from the one rank 0 commits.
    """
    if env.backend is None:
        return True
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine if env.backend == "gloo" else mine.to(env.device))
    diverged = [r for r, other in enumerate(gathered) if not torch.equal(other.cpu(), gathered[0].cpu())]
    if diverged:
        raise RuntimeError(f"ranks {diverged} hold different parameters from rank 0")
    return True


def verify_replicas_identical(model: torch.nn.Module, env: DistEnv) -> bool:
    """``replicas_identical`` for a replicated module's parameters."""
    return replicas_identical(parameter_fingerprint(model.parameters()), env)


def collective_timeout(config) -> float:
    """The stage's ``collectiveTimeoutMinutes`` (SFT and GRPO settings), else 60."""
    settings = getattr(config, "sft", None) or getattr(config, "grpo", None)
    return float(getattr(settings, "collective_timeout_minutes", 60.0))


def run_on_ranks(config, train_stage):
    """Run a training stage's ``train_stage(config, env, work, metrics)`` on this rank.

    Joins the process group, makes the work dir, gives rank 0 the metrics endpoint and
    log (other ranks record nothing, so series and lines are not duplicated), and
    always closes both on the way out.
    """
    from .metrics import METRICS_LOG, StageMetrics
    from .runtime import work_dir

    env = init_distributed(collective_timeout(config))
    work = work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    metrics = StageMetrics(config.run, config.stage, config.metrics_port if env.is_main else 0,
                           work / METRICS_LOG if env.is_main else None)
    try:
        return train_stage(config, env, work, metrics.start())
    finally:
        metrics.close()
        shutdown(env)
