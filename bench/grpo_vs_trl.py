"""GRPO step time and throughput: visionr1's engine against TRL's GRPOTrainer, one run, CPU.

Both sides train the same tiny Qwen2 (built from a config, saved locally) on the same
prompts with the same settings: group size, completion budget, prompts per step, beta,
epsilon, temperature, learning rate, sequence-mean loss, HFRRF reward, HF generate
(no vLLM), one optimizer step per rollout batch. Measured: seconds per step and
completion tokens per second (generation + training), after one warm-up step each.
Then both losses are computed on the same inputs (same rollout, old and reference
log-probs) to show the objective is the same.

    .venv/bin/python bench/grpo_vs_trl.py [--steps 8] [--out bench/results/grpo_vs_trl.json]

The model is text-only: TRL's vision path needs Qwen2.5-VL's combined processor, which
needs torchvision, which the CPU wheel set here cannot import.
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


def run_trl(model_dir: Path, problems, args, out_dir: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    steps: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    rows = [{"prompt": [{"role": "user", "content": p.problem}], "answer": p.answer} for p in problems]
    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=args.steps + 1, learning_rate=args.lr,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_len, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, epsilon_high=0.2, loss_type="grpo", num_iterations=1, scale_rewards="group",
        use_bias_correction_kl=False,  # TRL 1.16 defaults to weighting the KL by the ratio; GRPO does not
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1, report_to=[], save_strategy="no",
        seed=0, dataloader_num_workers=0, disable_dropout=True, shuffle_dataset=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=[reward_for_trl], args=config, train_dataset=Dataset.from_list(rows), callbacks=[Timer()],
    )
    trainer.train()
    return trainer, steps[1:], lengths[1:]


def run_ours(model_dir: Path, problems, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The stage scores completions through LogprobModel's chunked head, as grpo/trainer.py loads it.
    policy = LogprobModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    reference = LogprobModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval()
    reference.requires_grad_(False)
    cfg = GRPOStageConfig.model_validate({
        "run": "bench", "stage": "ptst-1", "outputUri": "file:///tmp/bench", "storage": {"uri": "file:///tmp"},
        "model": {"name": str(model_dir)}, "ptstIndex": 1, "ptstTotal": 1, "data": {"source": "/tmp/none"},
        "ptst": {"maxCompletionLength": args.max_len, "numGenerations": args.group, "steps": args.steps + 1},
        "grpo": {"learningRate": args.lr, "rolloutBatchSize": args.prompts, "microBatchSize": args.prompts * args.group,
                 "beta": args.beta, "rolloutBackend": "hf", "maxPromptLength": 128, "temperature": 1.0},
    })
    env = DistEnv(0, 1, 0, "cpu", None)
    engine = TorchEngine(policy, env, EngineSpec(0, "fp32", args.prompts * args.group, 1.0, args.lr))
    state = GRPOState(cfg, env, engine, FrozenModel(reference) if args.beta else None, tok, None,
                      HFRollout(engine, tok), problems, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    steps, lengths = [], []
    for step in range(args.steps + 1):
        stats = grpo_step(state, step)
        steps.append(stats["step_seconds"])
        lengths.append(stats["completion_length_mean"])
    return state, steps[1:], lengths[1:]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/grpo_vs_trl.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    problems = make_problems(64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers)
        trainer, trl_steps, trl_lens = run_trl(model_dir, problems, args, Path(tmp) / "trl")
        state, our_steps, our_lens = run_ours(model_dir, problems, args)
        loss = equal_loss_check(state, trainer, problems, args)
    completions = args.prompts * args.group

    def summary(steps, lens):
        step = statistics.median(steps)
        tokens = statistics.mean(lens) * completions
        return {"step_seconds_median": round(step, 4), "step_seconds": [round(s, 4) for s in steps],
                "completion_length_mean": round(statistics.mean(lens), 2),
                "tokens_per_second": round(tokens / step, 1)}

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        "settings": vars(args) | {"completions_per_step": completions},
        "trl": summary(trl_steps, trl_lens),
        "visionr1": summary(our_steps, our_lens),
        "loss_on_equal_inputs": loss,
    }
    result["speedup_tokens_per_second"] = round(result["visionr1"]["tokens_per_second"] / result["trl"]["tokens_per_second"], 2)
    result["speedup_step_time"] = round(result["trl"]["step_seconds_median"] / result["visionr1"]["step_seconds_median"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("trl", "visionr1", "loss_on_equal_inputs", "speedup_tokens_per_second", "speedup_step_time")}, indent=2))


if __name__ == "__main__":
    main()
