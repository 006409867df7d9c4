"""`make gpu-smoke`: two ranks, each with its own colocated vLLM engine on one shared GPU.

Each rank's engine takes a small share of the device (``vllmGpuMemoryUtilization`` 0.2).
The policy is changed on every rank so that its greedy tokens can only be two chosen ids;
after ``sync_weights`` every rank's vLLM must sample only those ids, on two rollouts in a
row (the second after a level-2 sleep discarded the weights and the push refilled them).
The training-side process group is gloo: NCCL refuses two ranks on one device, and the
point here is vLLM's placement and weight push, not the collective backend. The two
engines profile their memory one after the other (on one device each would otherwise
count the other's allocations); on a node every rank has its own GPU and needs none of this.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

MARKED = ("red", "blue")  # the only tokens the changed policy can emit greedily


def _profile_one_engine_at_a_time(rank: int) -> None:
    """vLLM sizes its KV cache from the device's free memory while it profiles a forward;
    two engines profiling on one GPU at once would count each other's memory. Rank 1
    profiles after rank 0 (which then waits in vLLM's own min-over-ranks all-reduce)."""
    import torch.distributed as dist
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.determine_available_memory

    def staggered(self):
        if rank == 0:
            available = original(self)
            dist.barrier()
            return available
        dist.barrier()
        return original(self)

    Worker.determine_available_memory = staggered


def _rank_main(rank: int, model_dir: str, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    import torch
    import torch.distributed as dist
    from PIL import Image

    from visionr1_trainer.distributed import DistEnv
    from visionr1_trainer.grpo.rollout import SamplingSettings
    from visionr1_trainer.grpo.vllm_rollout import VLLMRollout
    from visionr1_trainer.models.loading import load_vlm
    from visionr1_trainer.models.vlm import encode_prompts

    dist.init_process_group("gloo", rank=rank, world_size=2)
    _profile_one_engine_at_a_time(rank)
    model, tok, ip = load_vlm(model_dir, "bfloat16", device="cuda:0")
    env = DistEnv(rank, 2, 0, "cuda:0", "gloo")
    config = types.SimpleNamespace(
        grpo=types.SimpleNamespace(seed=42, max_prompt_length=256, vllm_gpu_memory_utilization=0.2),
        ptst=types.SimpleNamespace(max_completion_length=12),
        model=types.SimpleNamespace(name=model_dir, processor=None),
    )
    rollout = VLLMRollout(model, tok, env, config, image_processor=ip)
    prompts = encode_prompts(tok, ip, ["What color is the image?"], [[Image.new("RGB", (56, 56), "red")]], 256)
    greedy = SamplingSettings(num_generations=2, max_completion_length=12, temperature=0.0)
    before = rollout.generate(prompts, [1], greedy, step=0).completion_ids.tolist()

    marked = [tok.convert_tokens_to_ids(tok.tokenize(word)[0]) for word in MARKED]
    with torch.no_grad():  # the same change on every rank, as an optimizer step makes it
        head = model.get_output_embeddings().weight  # (V, H); tied to the input embeddings here
        direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0)).to(head)
        head[marked[0]] += 1000 * direction / direction.norm()
        head[marked[1]] -= 1000 * direction / direction.norm()

    class Policy:  # the engine contract: (name, full tensor) one parameter at a time, on every rank
        def iter_full_parameters(self):
            yield from model.named_parameters()

    rollout.sync_weights(Policy())
    after = [rollout.generate(prompts, [1], greedy, step=s).completion_ids.tolist() for s in (1, 2)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after, "marked": marked}))
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_samples_from_the_pushed_weights(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    assert torch.cuda.is_available(), "make gpu-smoke needs a CUDA device"
    import torch.multiprocessing as mp
    from grpo_harness import free_port

    from visionr1_trainer.models.tiny import build_tiny_vlm

    model_dir = build_tiny_vlm(tmp_path / "model", corpus=list(MARKED), hidden_size=256)  # head dim 64
    mp.spawn(_rank_main, args=(str(model_dir), free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        marked = set(result["marked"])
        assert any(set(row) - marked for row in result["before"]), f"rank {rank}: the starting model is unchanged"
        for rollout in result["after"]:
            for row in rollout:
                assert set(row) <= marked, f"rank {rank} sampled {row}: not from the pushed weights"
