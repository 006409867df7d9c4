"""GRPO throughput on 2 CPU ranks under DeepSpeed ZeRO-3: our GRPO stage against TRL's
GRPOTrainer under accelerate with DeepSpeed ZeRO-3, alternating step by step.

Both sides run in the same two processes (torchrun, gloo, DeepSpeed's CPU accelerator),
each with its own ZeRO-3 engine over both ranks: our stage's ``load_models`` (policy and
reference partitioned as they load, exactly as ``deepspeedZeroStage: 3`` builds them) and
TRL's GRPOTrainer given ``GRPOConfig(deepspeed=<a ZeRO-3 config>)``, which accelerate
turns into its DeepSpeed plugin (TRL partitions its reference model with the same
config). TRL's step i runs on both ranks, then ours from a TRL callback on both ranks
(every collective of one side ends before the other side's start), so the two sides
alternate as in the one-process cases. The tiny Qwen2.5-VL of the tests on image prompts
(one image each, shared prefix with the image tokens on our side), the global batch
equal on both sides (``--prompts`` prompts x ``--group`` completions over both ranks).

Equal loss on equal inputs: before the first step (TRL's ``on_train_begin``, both engines
built, both models still the same saved weights), each rank scores one rollout of its
own prompts with both objectives through both ZeRO-3 engines, given the same old and
reference log-probs.

    nice -n 10 .venv/bin/python bench/grpo_vs_trl_zero3.py --pairs 10

The launcher starts ``torchrun --nproc_per_node 2`` on this file and writes
``bench/results/grpo_vs_trl_zero3.json`` from rank 0's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import grpo_vs_trl as one  # noqa: E402  (the one-process cases: settings, callback, summary)


def zero3_stage_config(model_dir: Path, work: Path, args):
    """Our stage's config for the bench: the one-process case's settings, ZeRO-3."""
    from visionr1_trainer.config import GRPOStageConfig

    return GRPOStageConfig.model_validate({
        "run": "bench", "stage": "ptst-1", "outputUri": f"file://{work}/out", "storage": {"uri": f"file://{work}"},
        "model": {"name": str(model_dir), "dtype": "float32"}, "ptstIndex": 1, "ptstTotal": 1,
        "data": {"source": "/tmp/none"},
        "ptst": {"maxCompletionLength": args.max_len, "numGenerations": args.group, "steps": args.pairs + 1},
        "grpo": {"learningRate": args.lr, "rolloutBatchSize": args.prompts,
                 "microBatchSize": args.prompts * args.group // 2, "beta": args.beta, "rolloutBackend": "hf",
                 "maxPromptLength": 256, "temperature": 1.0, "warmupSteps": 0, "deepspeedZeroStage": 3,
                 "collectiveTimeoutMinutes": 10},
    })


def trl_deepspeed_config(micro_batch: int, world_size: int, hidden_size: int, ours: bool = False) -> dict:
    """TRL's side: ZeRO-3 with the HF Trainer's AdamW; batch and clipping as ours (the HF
    Trainer's "auto" batch took a world size of 1 when the model loaded).

    The ZeRO-3 block is the one accelerate's and transformers' DeepSpeed guides give: the
    bucket sizes and the persistence threshold "auto", which transformers fills from the
    hidden size (the same numbers our stage uses on GPUs). ``ours``: our stage's own block
    for CPU ranks instead (``deepspeed_config(cpu_ranks=True)``: DeepSpeed's default
    buckets), to show what the ratio owes to it.

    The runs before 2026-12-02 04:40 gave TRL no ZeRO-3 block at all: DeepSpeed's default
    persistence threshold (1e5 elements) then kept every parameter of the tiny model (the
    largest has 12,288) whole on every rank, so TRL's policy gathered nothing while ours
    gathered every layer."""
    from visionr1_trainer.distributed import deepspeed_config

    block = {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
             "stage3_param_persistence_threshold": "auto"}
    if ours:
        block = deepspeed_config(3, "fp32", micro_batch, 1.0, world_size, hidden_size, cpu_ranks=True)["zero_optimization"]
    return {"zero_optimization": block,
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size, "gradient_clipping": 1.0}


def partitioned(model) -> dict:
    """How much of ``model`` ZeRO-3 partitions (the rest each rank keeps whole: persistent)."""
    params = list(model.parameters())
    split = [p for p in params if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)]
    return {"parameters": len(params), "partitioned": len(split),
            "partitioned_elements": sum(p.ds_numel for p in split),
            "elements": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def worker(args) -> int:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from visionr1_trainer.distributed import barrier, init_distributed
    from visionr1_trainer.grpo.rollout import HFRollout
    from visionr1_trainer.grpo.trainer import GRPOState, load_models
    from visionr1_trainer.models.loading import load_model
    from visionr1_trainer.models.tiny import build_tiny_vlm
    from visionr1_trainer.models.vlm import IMAGE_TOKEN

    env = init_distributed(timeout_minutes=10)
    # accelerate takes DeepSpeed for a GPU thing: without a GPU it finds no backend and counts
    # one process (so the HF Trainer's batch is one rank's). The state it then uses is made
    # here, on the gloo group both sides share, with its DeepSpeed switch on.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    tmp = Path(args.work)
    model_dir = tmp / "vlm"
    if env.rank == 0:
        build_tiny_vlm(model_dir, corpus=[f"Final Answer: {c}" for c in one.COLORS])
    barrier(env)
    problems = [one.ImageProblem("<image>What color is the image? Answer with a color.", name, rgb, args.image_size)
                for name, rgb in one.COLORS.items() for _ in range(8)]
    config = zero3_stage_config(model_dir, tmp / f"work{env.rank}", args)
    torch.manual_seed(env.rank)
    _, engine, reference, tok, image_processor, _ = load_models(config, env, tmp / f"work{env.rank}")
    state = GRPOState(config, env, engine, reference, tok, image_processor, HFRollout(engine, tok), problems,
                      tok.convert_tokens_to_ids(IMAGE_TOKEN))

    pairs: list[dict] = []
    trl_lengths: list[float] = []
    loss: dict = {}
    args.prompts_per_rank = args.prompts // env.world_size

    class EqualLoss(TrainerCallback):
        def on_train_begin(self, *a, **k):
            loss.update(one.equal_loss_check(state, trainer, problems[env.rank * 8:], _RankArgs(args),
                                             copy_weights=False))

    per_rank = args.prompts * args.group // env.world_size
    hidden = engine.module.config.text_config.hidden_size
    trl_ds = trl_deepspeed_config(per_rank, env.world_size, hidden, ours=args.trl_our_buckets)
    trl_args = one.trl_config(args, tmp / "trl", deepspeed=trl_ds,
                              use_cpu=False, per_device_train_batch_size=per_rank,
                              accelerator_config={"use_configured_state": True})
    rows = [{"prompt": [{"role": "user", "content": p.problem.replace("<image>", "")}], "image": p.load_images()[0],
             "answer": p.answer} for p in problems]
    # loaded after GRPOConfig: its ZeRO-3 config is live, so the model is partitioned as it loads
    trl_model = load_model(str(model_dir), "float32")
    trainer = GRPOTrainer(
        model=trl_model, processing_class=one.trl_vlm_processor(model_dir, image_processor),
        reward_funcs=[one.reward_for_trl], args=trl_args, train_dataset=Dataset.from_list(rows),
        callbacks=[EqualLoss(), one.alternate_callback(state, pairs, trl_lengths)],
    )
    trainer.train()
    for pair, (length, longest) in zip(pairs, trl_lengths):
        pair["trl_length"], pair["trl_length_max"] = length, longest
    (tmp / f"rank{env.rank}.json").write_text(json.dumps({
        "pairs": pairs, "loss": loss, "trl_engine": type(trainer.model_wrapped).__module__,
        "trl_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "trl_processes": trainer.accelerator.num_processes, "trl_train_batch": trainer.args.world_size * per_rank,
        "ours": engine.describe(), "threads": torch.get_num_threads(),
        "zero3_settings": {"ours": engine._ds.config["zero_optimization"] if hasattr(engine._ds, "config") else None,
                           "trl": {k: v for k, v in trainer.accelerator.state.deepspeed_plugin.deepspeed_config[
                               "zero_optimization"].items()}},
        "partitioned": {"ours_policy": partitioned(engine.module), "ours_reference": partitioned(reference.module),
                        "trl_policy": partitioned(trainer.model_wrapped.module),
                        "trl_reference": partitioned(trainer.ref_model.module if hasattr(trainer.ref_model, "module")
                                                     else trainer.ref_model)},
    }))
    barrier(env)
    return 0


class _RankArgs:
    """The loss check's view of ``args`` on one rank: its share of the prompts."""

    def __init__(self, args):
        self.__dict__.update(vars(args))
        self.prompts = args.prompts_per_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv: list[str]) -> dict:
    """Both ranks under torchrun; the result from their files."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="visionr1-grpo-vs-trl-z3-") as tmp:
        env = {**os.environ, "VISIONR1_FORCE_CPU": "1", "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": str(args.threads or 1), "BENCH_ZERO3_WORKER": "1",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                      str(Path.home() / ".cache/visionr1/torch_extensions"))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, *argv, "--work", tmp]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        ranks = [Path(tmp) / f"rank{r}.json" for r in (0, 1)]
        if proc.returncode or not all(p.exists() for p in ranks):
            errors = "".join(p.read_text() for p in sorted(Path(tmp).glob("rank*.error")))
            raise SystemExit(f"the 2-rank run failed (exit {proc.returncode}):\n{errors or proc.stderr[-6000:]}")
        r0, r1 = (json.loads(p.read_text()) for p in ranks)
    completions = args.prompts * args.group
    summary = one.pair_summary(r0["pairs"], completions)
    return {
        "command": " ".join([Path(sys.executable).name, __file__.replace(str(ROOT) + "/", ""), *argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        "ranks": 2, "torch_threads_per_rank": r0["threads"],
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "niceness": os.nice(0),
        "settings": vars(args) | {"completions_per_step": completions},
        "ours_engine": r0["ours"], "trl_engine": r0["trl_engine"], "trl_zero_stage": r0["trl_zero_stage"],
        "trl_processes": r0["trl_processes"], "trl_train_batch": r0["trl_train_batch"],
        "partitioned": r0["partitioned"], "zero3_settings": r0["zero3_settings"],
        **summary,
        "goal_1_3x": one.goal_verdict(summary),
        "loss_on_equal_inputs": {"rank0": r0["loss"], "rank1": r1["loss"]},
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="measured pairs (after one warm-up pair)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step over both ranks")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: 1, 2 ranks on 2 cores)")
    parser.add_argument("--trl-our-buckets", action="store_true",
                        help="give TRL our stage's ZeRO-3 block for CPU ranks instead of the guides' 'auto' values")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="bench/results/grpo_vs_trl_zero3.json")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if os.environ.get("BENCH_ZERO3_WORKER") == "1":
        try:
            sys.exit(worker(args))
        except Exception:
            import traceback

            Path(args.work, f"rank{os.environ.get('RANK', '0')}.error").write_text(traceback.format_exc())
            raise
    if args.prompts % 2:
        raise SystemExit("--prompts: must split evenly over the 2 ranks")
    result = launch(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("pairs", "settings")}, indent=2))


if __name__ == "__main__":
    main()
