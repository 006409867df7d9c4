"""GRPO throughput: visionr1's engine against TRL's GRPOTrainer, alternating step by step, CPU.

Both sides train the same tiny Qwen2 (built from a config, saved locally) on the same
prompts with the same settings: group size, completion budget, prompts per step, beta,
epsilon, temperature, learning rate, sequence-mean loss, HFRRF reward, HF generate
(no vLLM), one optimizer step per rollout batch. The two sides run in one process and
alternate: TRL's step i, then ours (from a TRL callback, outside TRL's timed step), so
both see the same machine load at nearly the same moment. Per pair: each side's
completion tokens per second over its whole step; the ratio ours / TRL's. Reported: the
median ratio and its spread (min, quartiles, max) over the pairs after one warm-up pair.
Then both losses are computed on the same inputs (same rollout, old and reference
log-probs) to show the objective is the same.

    nice -n 10 .venv/bin/python bench/grpo_vs_trl.py [--pairs 12] [--case text|image]

Both sides also keep their activations (TRL 1.16 defaults ``gradient_checkpointing`` on;
our stage's ``auto`` is off at these lengths). Per side, besides wall time, this process's
CPU time (``process_time``): a pair's CPU-time ratio is less moved by other jobs on the
machine than its wall-time ratio, though not immune (shared caches and cores).

``--case image``: image prompts (one ``--image-size`` square image each, so each prompt's
shared prefix holds its image tokens and the vision tower runs) on the tiny Qwen2.5-VL of
the tests, on both sides. TRL's processing class is the model's saved processor (which
needs torchvision for its video part: the ``bench`` extra pins it) with the same PIL image
processor our side uses, so both see the same pixel values and prompt ids.

The case on 2 CPU ranks under ZeRO-3 is ``bench/grpo_vs_trl_zero3.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from visionr1_trainer.config import GRPOStageConfig
from visionr1_trainer.distributed import DistEnv
from visionr1_trainer.grpo.algos import group_advantages, policy_loss
from visionr1_trainer.grpo.batch import build_policy_batch, sequence_logprobs
from visionr1_trainer.grpo.engine import EngineSpec, FrozenModel, TorchEngine
from visionr1_trainer.grpo.logprob_head import LogprobModel
from visionr1_trainer.grpo.reward import hard_format_result_reward
from visionr1_trainer.grpo.rollout import HFRollout, SamplingSettings
from visionr1_trainer.grpo.trainer import GRPOState, grpo_step
from visionr1_trainer.models.tiny import build_tokenizer
from visionr1_trainer.models.vlm import IMAGE_TOKEN, encode_prompts


@dataclass
class Problem:
    problem: str
    answer: str

    def load_images(self) -> list:
        return []


def make_problems(n: int, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append(Problem(f"What is {a} + {b}? Think, then answer.", str(a + b)))
    return out


def build_model(directory: Path, hidden: int, layers: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer([p.problem for p in make_problems(200)])
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def reward_for_trl(completions, answer, **_):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [hard_format_result_reward(t, a) for t, a in zip(texts, answer)]


def stage_parts(model_dir: Path, policy, args):
    """The stage config (the bench's settings), a one-process environment and the policy's engine."""
    cfg = GRPOStageConfig.model_validate({
        "run": "bench", "stage": "ptst-1", "outputUri": "file:///tmp/bench", "storage": {"uri": "file:///tmp"},
        "model": {"name": str(model_dir)}, "ptstIndex": 1, "ptstTotal": 1, "data": {"source": "/tmp/none"},
        "ptst": {"maxCompletionLength": args.max_len, "numGenerations": args.group, "steps": args.pairs + 1},
        "grpo": {"learningRate": args.lr, "rolloutBatchSize": args.prompts, "microBatchSize": args.prompts * args.group,
                 "beta": args.beta, "rolloutBackend": "hf", "maxPromptLength": 128, "temperature": 1.0,
                 "warmupSteps": 0},
    })
    env = DistEnv(0, 1, 0, "cpu", None)
    engine = TorchEngine(policy, env, EngineSpec(0, "fp32", args.prompts * args.group, 1.0, args.lr))
    return cfg, env, engine


def our_state(model_dir: Path, problems, args):
    """Our GRPO stage's state on ``model_dir`` (torch engine, one process), as the stage builds it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The stage scores completions through LogprobModel's chunked head, as grpo/trainer.py loads it.
    policy = LogprobModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    reference = LogprobModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval()
    reference.requires_grad_(False)
    cfg, env, engine = stage_parts(model_dir, policy, args)
    return GRPOState(cfg, env, engine, FrozenModel(reference) if args.beta else None, tok, None,
                     HFRollout(engine, tok), problems, tok.convert_tokens_to_ids(IMAGE_TOKEN))


def trl_config(args, out_dir: Path, **extra):
    """TRL's GRPOConfig with the bench's settings (equal to ours, see the module docstring)."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(out_dir), max_steps=args.pairs + 1, learning_rate=args.lr,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_len, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, epsilon_high=0.2, loss_type="grpo", num_iterations=1, scale_rewards="group",
        use_bias_correction_kl=False,  # TRL 1.16 defaults to weighting the KL by the ratio; GRPO does not
        # TRL 1.16 defaults to recomputing activations in backward; our stage's "auto" does not at these
        # lengths, so both keep them (the runs before 2026-12-02 01:20 had TRL's default on).
        gradient_checkpointing=False,
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1, report_to=[], save_strategy="no",
        seed=0, dataloader_num_workers=0, disable_dropout=True, shuffle_dataset=True, lr_scheduler_type="constant",
    )
    return GRPOConfig(**(settings | extra))


def alternate_callback(state, pairs: list[dict], trl_lengths: list[float]):
    """A TRL callback that times TRL's step and runs our step i right after TRL's step i.

    Wall time (``perf_counter``) and this process's CPU time (``process_time``) per side;
    each side keeps its own torch RNG stream.
    """
    from transformers import TrainerCallback

    ours_rng = torch.Generator().manual_seed(0)  # our sampling stream, kept apart from TRL's

    class Alternate(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            trl_seconds, trl_cpu = time.perf_counter() - self.t, time.process_time() - self.c
            theirs = torch.random.get_rng_state()
            torch.random.set_rng_state(ours_rng.get_state())
            c = time.process_time()
            stats = grpo_step(state, len(pairs))  # our step i, right after TRL's step i
            ours_cpu = time.process_time() - c
            ours_rng.set_state(torch.random.get_rng_state())
            torch.random.set_rng_state(theirs)
            pairs.append({"trl_seconds": trl_seconds, "trl_cpu_seconds": trl_cpu, "ours_seconds": stats["step_seconds"],
                          "ours_cpu_seconds": ours_cpu, "ours_length": stats["completion_length_mean"],
                          "ours_length_max": stats["completion_length_max"]})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                trl_lengths.append((logs["completions/mean_length"], logs.get("completions/max_length")))

    return Alternate()


def run_alternating(trl_model, processing_class, rows: list[dict], state, args, out_dir: Path):
    """TRL's steps with ours in between; ``(trainer, pairs)``, each pair's seconds and tokens."""
    from datasets import Dataset
    from trl import GRPOTrainer

    pairs: list[dict] = []
    trl_lengths: list[float] = []
    trainer = GRPOTrainer(
        model=trl_model, processing_class=processing_class, reward_funcs=[reward_for_trl],
        args=trl_config(args, out_dir), train_dataset=Dataset.from_list(rows),
        callbacks=[alternate_callback(state, pairs, trl_lengths)],
    )
    trainer.train()
    for pair, (length, longest) in zip(pairs, trl_lengths):
        pair["trl_length"], pair["trl_length_max"] = length, longest
    return trainer, pairs


def text_case(tmp: Path, args):
    """The tiny Qwen2 on arithmetic prompts: ``(trainer, state, pairs, problems)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = make_problems(64)
    model_dir = build_model(tmp / "model", args.hidden, args.layers)
    state = our_state(model_dir, problems, args)
    rows = [{"prompt": [{"role": "user", "content": p.problem}], "answer": p.answer} for p in problems]
    trainer, pairs = run_alternating(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     AutoTokenizer.from_pretrained(model_dir), rows, state, args, tmp / "trl")
    return trainer, state, pairs, problems


def equal_loss_check(state: GRPOState, trainer, problems, args, copy_weights: bool = True) -> dict:
    """Both objectives on one rollout with given old and reference log-probs.

    ``copy_weights``: TRL's model takes our policy's weights first (after training, when
    the two differ); the ZeRO-3 case checks before the first step instead, both sides
    still on the same saved weights.

    The prompts are our encoding (``encode_prompts``; the tests and the image case check it
    gives TRL's prompt ids and pixel values); image prompts hand TRL each completion's own
    copy of its prompt's patches, as TRL's batches hold them.
    """
    tok, policy = state.tokenizer, state.engine
    chosen = problems[: args.prompts]
    images = [p.load_images() for p in chosen]
    prompts = encode_prompts(tok, state.image_processor, [p.problem for p in chosen], images, 256)
    counts = [len(i) for i in images]
    torch.manual_seed(1)
    rollout = HFRollout(policy, tok).generate(prompts, counts, SamplingSettings(args.group, args.max_len))
    batch = build_policy_batch(prompts, counts, rollout, args.group, tok, state.image_token_id)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(batch.rows)])
    advantages = group_advantages(rewards, args.group)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(policy, batch, range(batch.rows), 1.0, "cpu")
    gen = torch.Generator().manual_seed(2)
    old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)  # engages both clip sides
    ref = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)
    prompt_ids = prompts.input_ids.repeat_interleave(args.group, 0)
    prompt_mask = prompts.attention_mask.repeat_interleave(args.group, 0)
    vision = {}
    if prompts.pixel_values is not None:
        input_ids = torch.cat([prompt_ids, batch.completion_ids], 1)
        vision = {"pixel_values": torch.cat(batch.pixel_rows), "image_grid_thw": torch.cat(batch.grid_rows),
                  "num_images": [int(g.shape[0]) for g in batch.grid_rows],
                  "mm_token_type_ids": (input_ids == state.image_token_id).long()}
    with torch.no_grad():
        ours, _ = policy_loss(logprobs, old, ref, advantages, batch.loss_mask, 0.2, 0.2, args.beta, "sequence_mean")
        trl_inputs = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": batch.completion_ids, "completion_mask": batch.loss_mask,
            "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref, **vision,
        }
        if copy_weights:
            trainer.model.load_state_dict(policy.full_state_dict())
        trainer.model.eval()
        theirs = trainer._compute_loss(trainer.model, trl_inputs)
        # The same objective on TRL's own log-probs: isolates the loss math from the
        # forward pass (batching and kernel order differ in the last float32 digits).
        trl_logprobs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, batch.completion_ids], 1),
            torch.cat([prompt_mask, batch.loss_mask], 1), batch.completion_len, **vision,
        )
        ours_on_trl_logprobs, _ = policy_loss(trl_logprobs, old, ref, advantages, batch.loss_mask, 0.2, 0.2,
                                              args.beta, "sequence_mean")
    return {
        "visionr1": float(ours), "trl": float(theirs), "abs_diff": abs(float(ours) - float(theirs)),
        "visionr1_on_trl_logprobs": float(ours_on_trl_logprobs),
        "abs_diff_same_logprobs": abs(float(ours_on_trl_logprobs) - float(theirs)),
        "max_logprob_diff": float((trl_logprobs - logprobs)[batch.loss_mask.bool()].abs().max()),
    }


@dataclass
class ImageProblem:
    problem: str
    answer: str
    color: tuple
    size: int = 56

    def load_images(self) -> list:
        from PIL import Image

        return [Image.new("RGB", (self.size, self.size), self.color)]


COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def trl_vlm_processor(directory: Path, image_processor):
    """TRL's processing class for the tiny Qwen2.5-VL: the saved processor (its video part
    needs torchvision) with ``image_processor`` in place of the default, so both sides
    preprocess images with the same object (PIL backend, as our stage without torchvision)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory)
    except ImportError as exc:
        raise SystemExit(f"--case image needs torchvision for TRL's Qwen2.5-VL processor (the bench extra "
                         f"pins it: pip install -c constraints.txt -e '.[bench]'): {exc}") from None
    processor.image_processor = image_processor
    return processor


def image_case(tmp: Path, args):
    """The tests' tiny Qwen2.5-VL, one image per prompt: ``(trainer, state, pairs, problems)``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from visionr1_trainer.models.loading import load_model
    from visionr1_trainer.models.tiny import build_tiny_vlm

    directory = tmp / "vlm"
    build_tiny_vlm(directory, corpus=[f"Final Answer: {c}" for c in COLORS])
    tok = AutoTokenizer.from_pretrained(directory)
    image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    problems = [ImageProblem("<image>What color is the image? Answer with a color.", name, rgb, args.image_size)
                for name, rgb in COLORS.items() for _ in range(8)]
    policy = LogprobModel(load_model(str(directory), "float32"))
    reference = LogprobModel(load_model(str(directory), "float32")).eval()
    reference.requires_grad_(False)
    cfg, env, engine = stage_parts(directory, policy, args)
    state = GRPOState(cfg, env, engine, FrozenModel(reference) if args.beta else None, tok, image_processor,
                      HFRollout(engine, tok), problems, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    rows = [{"prompt": [{"role": "user", "content": p.problem.replace("<image>", "")}], "image": p.load_images()[0],
             "answer": p.answer} for p in problems]
    trainer, pairs = run_alternating(load_model(str(directory), "float32"),
                                     trl_vlm_processor(directory, image_processor), rows, state, args, tmp / "trl")
    return trainer, state, pairs, problems


def spread(values: list[float]) -> dict:
    """Median and spread of ``values`` (min, quartiles, max), rounded."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "q1": round(q[0], 3), "q3": round(q[2], 3), "max": round(max(values), 3), "n": len(values)}


def pair_summary(pairs: list[dict], completions: int) -> dict:
    """Per-pair tokens/s on both sides and their ratios (wall and CPU time), after the warm-up pair."""
    out = {"pairs": []}
    for p in pairs[1:]:
        row = {}
        for side in ("ours", "trl"):
            tokens = p[f"{side}_length"] * completions
            row |= {f"{side}_seconds": round(p[f"{side}_seconds"], 4),
                    f"{side}_cpu_seconds": round(p[f"{side}_cpu_seconds"], 4),
                    f"{side}_tokens_per_s": round(tokens / p[f"{side}_seconds"], 1),
                    f"{side}_tokens_per_cpu_s": round(tokens / p[f"{side}_cpu_seconds"], 1)}
        # the rollout decodes until the longest completion of the batch ends: a pair whose
        # sides drew different longest completions did different amounts of work per token
        row |= {f"{side}_length_max": p.get(f"{side}_length_max") for side in ("ours", "trl")}
        row["ratio_tokens_per_s"] = round(row["ours_tokens_per_s"] / row["trl_tokens_per_s"], 3)
        row["ratio_step_time"] = round(p["trl_seconds"] / p["ours_seconds"], 3)
        row["ratio_tokens_per_cpu_s"] = round(row["ours_tokens_per_cpu_s"] / row["trl_tokens_per_cpu_s"], 3)
        out["pairs"].append(row)
    for key in ("ours_tokens_per_s", "trl_tokens_per_s", "ratio_tokens_per_s", "ratio_step_time",
                "ratio_tokens_per_cpu_s"):
        out[key] = spread([r[key] for r in out["pairs"]])
    return out


def goal_verdict(summary: dict, goal: float = 1.3) -> str:
    """Whether the median and the whole interquartile range meet the goal ratio."""
    r = summary["ratio_tokens_per_s"]
    if r["q1"] >= goal:
        return f"met: median {r['median']}x and lower quartile {r['q1']}x >= {goal}x"
    if r["median"] >= goal:
        return f"median only: median {r['median']}x >= {goal}x, lower quartile {r['q1']}x below"
    return f"not met: median {r['median']}x < {goal}x"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("text", "image"), default="text")
    parser.add_argument("--pairs", type=int, default=12, help="measured pairs (after one warm-up pair)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=56, help="image side in pixels (--case image)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: one per core). 1 by default: on a shared machine two threads "
                             "per process spin-wait against other jobs and single pairs swing (BENCHMARKS.md)")
    parser.add_argument("--out", default=None, help="default: bench/results/grpo_vs_trl[_<case>].json")
    return parser.parse_args(argv)


def run(args) -> dict:
    """One bench run: the chosen case, alternating pairs, the loss check; the result dict."""
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    completions = args.prompts * args.group
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="visionr1-grpo-vs-trl-") as tmp:
        trainer, state, pairs, problems = (text_case if args.case == "text" else image_case)(Path(tmp), args)
        loss = equal_loss_check(state, trainer, problems, args)
    summary = pair_summary(pairs, completions)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "niceness": os.nice(0),
        "settings": vars(args) | {"completions_per_step": completions},
        **summary,
        "goal_1_3x": goal_verdict(summary),
        "loss_on_equal_inputs": loss,
    }


def main() -> None:
    args = parse_args()
    result = run(args)
    out = Path(args.out or f"bench/results/grpo_vs_trl{'' if args.case == 'text' else '_' + args.case}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("pairs", "settings")}, indent=2))


if __name__ == "__main__":
    main()
