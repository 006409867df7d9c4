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

``--case image``: image prompts (a 56x56 image each, so each prompt's shared prefix holds
its image tokens and the vision tower runs) on the tiny Qwen2.5-VL of the tests, our side
only where TRL's vision path cannot run (TRL needs torchvision for Qwen2.5-VL's combined
processor, which this machine's CPU wheel set lacks): the result file says so.
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


def run_alternating(model_dir: Path, problems, args, out_dir: Path):
    """TRL's steps with ours in between; ``(trainer, state, pairs)``, each pair's seconds and tokens."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    state = our_state(model_dir, problems, args)
    pairs: list[dict] = []
    trl_lengths: list[float] = []
    ours_rng = torch.Generator().manual_seed(0)  # our sampling stream, kept apart from TRL's

    class Alternate(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, _args, trl_state, *a, **k):
            trl_seconds = time.perf_counter() - self.t
            step = len(pairs)
            theirs = torch.random.get_rng_state()
            torch.random.set_rng_state(ours_rng.get_state())
            stats = grpo_step(state, step)  # our step i, right after TRL's step i
            ours_rng.set_state(torch.random.get_rng_state())
            torch.random.set_rng_state(theirs)
            pairs.append({"trl_seconds": trl_seconds, "ours_seconds": stats["step_seconds"],
                          "ours_length": stats["completion_length_mean"]})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                trl_lengths.append(logs["completions/mean_length"])

    rows = [{"prompt": [{"role": "user", "content": p.problem}], "answer": p.answer} for p in problems]
    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=args.pairs + 1, learning_rate=args.lr,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_len, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, epsilon_high=0.2, loss_type="grpo", num_iterations=1, scale_rewards="group",
        use_bias_correction_kl=False,  # TRL 1.16 defaults to weighting the KL by the ratio; GRPO does not
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1, report_to=[], save_strategy="no",
        seed=0, dataloader_num_workers=0, disable_dropout=True, shuffle_dataset=True, lr_scheduler_type="constant",
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=[reward_for_trl], args=config, train_dataset=Dataset.from_list(rows), callbacks=[Alternate()],
    )
    trainer.train()
    for pair, length in zip(pairs, trl_lengths):
        pair["trl_length"] = length
    return trainer, state, pairs


def run_ours_only(state, pairs_wanted: int) -> list[dict]:
    """Our steps alone (the image case, where TRL's side cannot run here)."""
    out = []
    torch.manual_seed(0)
    for step in range(pairs_wanted + 1):
        stats = grpo_step(state, step)
        out.append({"ours_seconds": stats["step_seconds"], "ours_length": stats["completion_length_mean"]})
    return out


def equal_loss_check(state: GRPOState, trainer, problems, args) -> dict:
    """Both objectives on one rollout with given old and reference log-probs."""
    tok, policy = state.tokenizer, state.engine
    prompts = encode_prompts(tok, None, [p.problem for p in problems[: args.prompts]], [[]] * args.prompts, 128)
    torch.manual_seed(1)
    rollout = HFRollout(policy, tok).generate(prompts, [0] * args.prompts, SamplingSettings(args.group, args.max_len))
    batch = build_policy_batch(prompts, [0] * args.prompts, rollout, args.group, tok, state.image_token_id)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(batch.rows)])
    advantages = group_advantages(rewards, args.group)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(policy, batch, range(batch.rows), 1.0, "cpu")
    gen = torch.Generator().manual_seed(2)
    old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)  # engages both clip sides
    ref = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)
    with torch.no_grad():
        ours, _ = policy_loss(logprobs, old, ref, advantages, batch.loss_mask, 0.2, 0.2, args.beta, "sequence_mean")
        trl_inputs = {
            "prompt_ids": prompts.input_ids.repeat_interleave(args.group, 0),
            "prompt_mask": prompts.attention_mask.repeat_interleave(args.group, 0),
            "completion_ids": batch.completion_ids, "completion_mask": batch.loss_mask,
            "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        }
        trainer.model.load_state_dict(policy.full_state_dict())
        trainer.model.eval()
        theirs = trainer._compute_loss(trainer.model, trl_inputs)
        # The same objective on TRL's own log-probs: isolates the loss math from the
        # forward pass (batching and kernel order differ in the last float32 digits).
        trl_logprobs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([trl_inputs["prompt_ids"], batch.completion_ids], 1),
            torch.cat([trl_inputs["prompt_mask"], batch.loss_mask], 1), batch.completion_len,
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

    def load_images(self) -> list:
        from PIL import Image

        return [Image.new("RGB", (56, 56), self.color)]


def image_state(directory: Path, args):
    """Our stage's state on the tests' tiny Qwen2.5-VL with one image per prompt."""
    from visionr1_trainer.models.loading import load_model, load_processor_parts
    from visionr1_trainer.models.tiny import build_tiny_vlm

    colors = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    build_tiny_vlm(directory, corpus=[f"Final Answer: {c}" for c in colors])
    tok, processor = load_processor_parts(str(directory))
    problems = [ImageProblem("<image>What color is the image? Answer with a color.", name, rgb)
                for name, rgb in colors.items() for _ in range(8)]
    policy = LogprobModel(load_model(str(directory), "float32"))
    reference = LogprobModel(load_model(str(directory), "float32")).eval()
    reference.requires_grad_(False)
    cfg, env, engine = stage_parts(directory, policy, args)
    return GRPOState(cfg, env, engine, FrozenModel(reference) if args.beta else None, tok, processor,
                     HFRollout(engine, tok), problems, tok.convert_tokens_to_ids(IMAGE_TOKEN))


def spread(values: list[float]) -> dict:
    """Median and spread of ``values`` (min, quartiles, max), rounded."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "q1": round(q[0], 3), "q3": round(q[2], 3), "max": round(max(values), 3), "n": len(values)}


def pair_summary(pairs: list[dict], completions: int) -> dict:
    """Per-pair tokens/s on both sides and their ratio, after the warm-up pair."""
    measured = pairs[1:]
    out = {"pairs": []}
    for p in measured:
        row = {"ours_seconds": round(p["ours_seconds"], 4),
               "ours_tokens_per_s": round(p["ours_length"] * completions / p["ours_seconds"], 1)}
        if "trl_seconds" in p:
            row |= {"trl_seconds": round(p["trl_seconds"], 4),
                    "trl_tokens_per_s": round(p["trl_length"] * completions / p["trl_seconds"], 1)}
            row["ratio_tokens_per_s"] = round(row["ours_tokens_per_s"] / row["trl_tokens_per_s"], 3)
            row["ratio_step_time"] = round(p["trl_seconds"] / p["ours_seconds"], 3)
        out["pairs"].append(row)
    for key in ("ours_tokens_per_s", "trl_tokens_per_s", "ratio_tokens_per_s", "ratio_step_time"):
        values = [r[key] for r in out["pairs"] if key in r]
        if values:
            out[key] = spread(values)
    return out


def main() -> None:
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
    parser.add_argument("--out", default=None, help="default: bench/results/grpo_vs_trl[_<case>].json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    completions = args.prompts * args.group
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "text":
            problems = make_problems(64)
            model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers)
            trainer, state, pairs = run_alternating(model_dir, problems, args, Path(tmp) / "trl")
            loss = equal_loss_check(state, trainer, problems, args)
            trl_note = None
        else:
            state = image_state(Path(tmp) / "vlm", args)
            pairs, loss = run_ours_only(state, args.pairs), None
            trl_note = ("TRL's side not run: its Qwen2.5-VL path needs torchvision (the combined processor), "
                        "which this machine's CPU wheel set cannot import")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "niceness": os.nice(0),
        "settings": vars(args) | {"completions_per_step": completions},
        **pair_summary(pairs, completions),
        "loss_on_equal_inputs": loss,
    }
    if trl_note:
        result["trl"] = trl_note
    out = Path(args.out or f"bench/results/grpo_vs_trl{'' if args.case == 'text' else '_' + args.case}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("pairs", "settings")}, indent=2))


if __name__ == "__main__":
    main()
