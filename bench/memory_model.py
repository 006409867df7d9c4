"""Per-GPU peak memory of the SFT and GRPO stages, from a model of what each GPU holds.

    python bench/memory_model.py table          # the paper's settings, 7B / 32B / 72B (markdown)
    python bench/memory_model.py check          # small-size predictions against peaks measured on CPU

What one GPU holds (bytes; Psi parameters, N ranks; ZeRO stage z partitions what it names):

    policy weights   2 Psi            bf16, / N at z = 3
    gradients        4 Psi            fp32 (DeepSpeed accumulates in fp32: grad_accum_dtype, as
                                      distributed.deepspeed_config sets), / N at z >= 2; the torch
                                      engine (z = 0) keeps bf16 gradients (2 Psi) and fp32 copies
    optimizer        12 Psi           fp32 master copy + Adam m, v (ZeRO paper's K = 12), / N at z >= 1
    reference        2 Psi            bf16 frozen copy when beta > 0, / N when partitioned (z = 3)
    ZeRO-3 gathers   2 (2 L_max + V H) the largest gathered set: two decoder layers (prefetch) + lm_head
    activations      per token per decoder layer 2 (6 H + 2 kv + 4 I) bytes kept for backward
                     (Qwen2 layer in bf16 with flash/sdpa attention: layer input, normed input,
                     roped q and k, v, attention output, residual, normed input, gate, up,
                     SiLU(gate), product); with activation checkpointing per layer: 2 H per
                     token per layer plus one layer's full set while it is recomputed. The vision
                     tower the same way over its patches (4 per image token).
    log-probs        18 bytes per (token, vocabulary entry): bf16 logits and four fp32 copies
                     (upcast, log-softmax, and two in backward) -- over the whole
                     micro-batch unchunked, over one chunk of tokens chunked (measured on CPU:
                     ``check``)
    vLLM             gpu_memory_utilization x GPU memory while it samples (its weights, KV
                     cache and activations); about 1 GiB asleep (level 2: weights and KV freed)
    runtime          2 GiB: CUDA context, NCCL buffers, allocator slack (an assumption)

The GRPO peak is the larger of the rollout phase (states + vLLM awake) and the training
phase (states + ZeRO-3 gathers + activations + log-probs + vLLM asleep). Sequences: one
micro-batch holds ``micro_batch`` completions of ``T`` tokens and the distinct prompts they
share (the trainer runs each prompt once per micro-batch, its KV cache repeated).
Parameter counts come from the Qwen2.5-VL configs and are checked against transformers'
own model built on the meta device (tests/test_memory_model.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace

GiB = 2**30
BF16 = 2


@dataclass(frozen=True)
class Shape:
    """A Qwen2.5-VL: language model and vision tower dimensions."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    vision_hidden: int = 1280
    vision_depth: int = 32
    vision_intermediate: int = 3420
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# From the Hugging Face configs of Qwen/Qwen2.5-VL-{7B,32B,72B}-Instruct.
QWEN25_VL = {
    "7B": Shape(3584, 28, 28, 4, 18944, 152064, False),
    "32B": Shape(5120, 64, 40, 8, 27648, 152064, False, vision_intermediate=3456),
    "72B": Shape(8192, 80, 64, 8, 29568, 152064, False, vision_intermediate=3456),
}


def decoder_layer_params(s: Shape) -> int:
    """q, k, v (with bias), o (no bias), gate/up/down, two RMSNorms."""
    attention = s.hidden * s.hidden + s.hidden + 2 * (s.hidden * s.kv_dim + s.kv_dim) + s.hidden * s.hidden
    return attention + 3 * s.hidden * s.intermediate + 2 * s.hidden


def vision_params(s: Shape) -> int:
    """Patch embedding, blocks (qkv and proj with bias, SwiGLU MLP with bias, two RMSNorms), merger."""
    d, i = s.vision_hidden, s.vision_intermediate
    patch = 3 * s.temporal_patch * s.patch * s.patch * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * i + i) + (i * d + d) + 2 * d
    merged = d * s.merge**2
    merger = d + (merged * merged + merged) + (merged * s.hidden + s.hidden)
    return patch + s.vision_depth * block + merger


def param_count(s: Shape) -> int:
    embed = s.vocab * s.hidden
    return embed * (1 if s.tied else 2) + s.layers * decoder_layer_params(s) + s.hidden + vision_params(s)


# --- the parts --------------------------------------------------------------------------------


def model_states(psi: int, ranks: int, zero: int, reference: bool, reference_partitioned: bool) -> dict[str, float]:
    """Weights, gradients, optimizer state and the reference copy on one GPU (bytes)."""
    return {
        "weights": BF16 * psi / (ranks if zero == 3 else 1),
        # fp32 accumulation partitions; the torch engine's bf16 .grad beside its fp32 master grads
        "gradients": 4 * psi / (ranks if zero >= 2 else 1) + (BF16 * psi if zero == 0 else 0),
        "optimizer": 12 * psi / (ranks if zero >= 1 else 1),
        "reference": (BF16 * psi / (ranks if reference_partitioned and zero == 3 else 1)) if reference else 0.0,
    }


def zero3_gathered(s: Shape) -> float:
    """The largest set ZeRO-3 holds gathered at once: two decoder layers (prefetch) and lm_head."""
    return BF16 * (2 * decoder_layer_params(s) + s.vocab * s.hidden)


def layer_activation_bytes(hidden: int, kv_dim: int, intermediate: int, dtype_bytes: int = BF16) -> int:
    """Bytes one token leaves for backward in one decoder layer (see the module docstring)."""
    return dtype_bytes * (6 * hidden + 2 * kv_dim + 4 * intermediate)


def activations(tokens: int, layers: int, hidden: int, kv_dim: int, intermediate: int, checkpointing: bool,
                dtype_bytes: int = BF16) -> float:
    """Activations a forward keeps for backward over ``tokens`` tokens of ``layers`` layers."""
    per_layer = layer_activation_bytes(hidden, kv_dim, intermediate, dtype_bytes)
    if not checkpointing:
        return tokens * layers * per_layer
    return tokens * (layers * dtype_bytes * hidden + per_layer)  # layer inputs + one layer recomputed


def logprob_bytes(tokens: int, vocab: int, chunk: int | None, logit_bytes: int = BF16) -> float:
    """Full-vocabulary logits and four fp32 copies for ``tokens`` positions (or one chunk).

    In fp32 the logits are the first of the four copies (the upcast is a no-op)."""
    rows = tokens if chunk is None else min(chunk, tokens)
    return rows * vocab * ((0 if logit_bytes == 4 else logit_bytes) + 4 * 4)


@dataclass(frozen=True)
class Settings:
    """One stage on one cluster."""

    ranks: int
    zero: int = 3
    checkpointing: bool = True
    chunk: int | None = 1024  # None: full-vocabulary logits for the whole micro-batch
    reference_partitioned: bool = True
    gpu_memory: float = 80 * GiB
    vllm_utilization: float = 0.35
    vllm_asleep: float = 1 * GiB
    runtime: float = 2 * GiB
    image_tokens: int = 768  # one figure per prompt (about 600k pixels), inside the 1024-token prompt
    micro_batch: int = 4  # GRPO completions per forward/backward (microBatchSize)


def sequence_activations(s: Shape, st: Settings, text_tokens: int, images: int) -> float:
    lm = activations(text_tokens, s.layers, s.hidden, s.kv_dim, s.intermediate, st.checkpointing)
    patches = images * st.image_tokens * s.merge**2
    vit = activations(patches, s.vision_depth, s.vision_hidden, s.vision_hidden, s.vision_intermediate,
                      st.checkpointing)
    return lm + vit


def grpo_peak(s: Shape, st: Settings, completion: int, group: int, prompt: int = 1024, micro_batch: int = 4,
              beta: float = 0.01) -> dict[str, float]:
    """Per-GPU bytes by part and the peak of a PTST stage (``completion`` x ``group``)."""
    psi = param_count(s)
    states = model_states(psi, st.ranks, st.zero, beta > 0, st.reference_partitioned)
    prompts = math.ceil(micro_batch / group)  # distinct prompts in a micro-batch (groups are contiguous)
    train = {
        "zero3_gathered": zero3_gathered(s) if st.zero == 3 else 0.0,
        "activations": sequence_activations(s, st, prompts * prompt + micro_batch * completion, prompts),
        "logprobs": logprob_bytes(micro_batch * completion, s.vocab, st.chunk),
        "vllm": st.vllm_asleep,
    }
    rollout = {"vllm": st.vllm_utilization * st.gpu_memory}
    common = sum(states.values()) + st.runtime
    out = {**states, **{f"train_{k}": v for k, v in train.items()}, "rollout_vllm": rollout["vllm"],
           "runtime": st.runtime}
    out["train_phase"] = common + sum(train.values())
    out["rollout_phase"] = common + rollout["vllm"]
    out["peak"] = max(out["train_phase"], out["rollout_phase"])
    out.update(vllm_capacity(s, st, prompt + completion))
    return out


def vllm_capacity(s: Shape, st: Settings, sequence: int, overhead: float = 2 * GiB, tp: int = 1) -> dict[str, float]:
    """A vLLM engine's weights per GPU and how many full sequences its KV cache holds (0: it does not fit).

    With tensor parallel size ``tp`` each GPU holds 1/tp of the weights and of every token's KV."""
    weights = BF16 * param_count(s) / tp
    # K and V of every layer; tensor parallelism splits the KV heads (replicates them past kv_heads)
    kv_per_token = 2 * s.layers * s.head_dim * max(s.kv_heads / tp, 1) * BF16
    free = st.vllm_utilization * st.gpu_memory - weights - overhead
    return {"vllm_weights": weights, "vllm_kv_sequences": max(free, 0) / (kv_per_token * sequence)}


def sft_peak(s: Shape, st: Settings, cutoff: int = 16384, batch: int = 1, images: int = 1) -> dict[str, float]:
    """Per-GPU bytes by part and the peak of the cold-start SFT stage."""
    states = model_states(param_count(s), st.ranks, st.zero, False, False)
    train = {
        "zero3_gathered": zero3_gathered(s) if st.zero == 3 else 0.0,
        "activations": sequence_activations(s, st, batch * cutoff, batch * images),
        "logprobs": logprob_bytes(batch * cutoff, s.vocab, st.chunk),
    }
    out = {**states, **{f"train_{k}": v for k, v in train.items()}, "runtime": st.runtime}
    out["peak"] = sum(states.values()) + sum(train.values()) + st.runtime
    return out


# --- the table --------------------------------------------------------------------------------

STAGES = (("SFT 16K", None, None), ("PTST-1 4K x 16", 4096, 16), ("PTST-2 8K x 8", 8192, 8))


def stage_peak(s: Shape, st: Settings, completion: int | None, group: int | None) -> dict[str, float]:
    if completion is None:
        return sft_peak(s, st)
    return grpo_peak(s, st, completion, group, micro_batch=st.micro_batch)


def table(settings: dict[str, Settings], sizes=("7B", "32B", "72B")) -> str:
    head = "| model | stage | GPUs | " + " | ".join(settings) + " | largest part (first column) |"
    rows = [head, "|" + "---|" * (4 + len(settings))]
    for size in sizes:
        shape = QWEN25_VL[size]
        for name, completion, group in STAGES:
            for ranks in (8, 16, 32):
                cells, first = [], None
                for st in settings.values():
                    parts = stage_peak(shape, replace(st, ranks=ranks), completion, group)
                    first = first or parts
                    fits = "" if parts["peak"] <= st.gpu_memory else " ✗"
                    if parts.get("vllm_kv_sequences", 1) < 1:
                        fits += " †"  # a tp-1 vLLM engine cannot hold the weights in its share
                    cells.append(f"{parts['peak'] / GiB:.0f}{fits}")
                big = max((k for k in first if k not in ("peak", "train_phase", "rollout_phase", "vllm_weights",
                                                          "vllm_kv_sequences")), key=lambda k: first[k])
                rows.append(f"| {size} ({param_count(shape) / 1e9:.2f}B) | {name} | {ranks} | " + " | ".join(cells)
                            + f" | {big} {first[big] / GiB:.0f} GiB |")
    return "\n".join(rows)


def vllm_table(sizes=("7B", "32B", "72B"), utilization: float = 0.35, tps=(1, 2, 4, 8)) -> str:
    """Per GPU: a vLLM engine's weights and the 4K+1K / 8K+1K sequences its KV cache holds, by tp."""
    rows = ["| model | " + " | ".join(f"tp {tp}: weights, sequences 4K+1K / 8K+1K" for tp in tps) + " |",
            "|---|" + "---|" * len(tps)]
    st = Settings(ranks=8, vllm_utilization=utilization)
    for size in sizes:
        cells = []
        for tp in tps:
            four, eight = vllm_capacity(QWEN25_VL[size], st, 5120, tp=tp), vllm_capacity(QWEN25_VL[size], st, 9216, tp=tp)
            cells.append(f"{four['vllm_weights'] / GiB:.1f} GiB, {four['vllm_kv_sequences']:.0f} / "
                         f"{eight['vllm_kv_sequences']:.0f}")
        rows.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def breakdown(s: Shape, st: Settings, completion: int, group: int) -> str:
    """One PTST stage's parts, in GiB, as a table row per part."""
    parts = grpo_peak(s, st, completion, group, micro_batch=st.micro_batch)
    keep = [k for k in parts if k not in ("vllm_weights", "vllm_kv_sequences")]
    return "\n".join(["| part | GiB |", "|---|---|"] + [f"| {k} | {parts[k] / GiB:.1f} |" for k in keep])


# --- the small-size check on CPU -------------------------------------------------------------------

# A Qwen2.5-VL small enough for a CPU and large enough that activations dominate.
CHECK_SHAPE = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512)
CHECK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, tempfile
    import torch
    from visionr1_trainer.models.tiny import build_tiny_vlm
    from visionr1_trainer.models.loading import load_vlm
    torch.set_num_threads(1)
    mode, tokens, shape = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    path = build_tiny_vlm(tempfile.mkdtemp() + "/m", hidden_size=shape["hidden"], layers=shape["layers"])
    model, tok, _ = load_vlm(str(path), "float32")
    model.train()
    if mode == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def step(n):
        ids = torch.randint(20, 200, (1, n))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
        out.loss.backward()
    step(16)  # warm up kernels and the allocator; gradients exist from here on
    if mode == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        before = peak(); opt.step(); after = peak()
    else:
        before = peak(); step(tokens); after = peak()
    print(json.dumps({"delta": after - before, "params": sum(p.numel() for p in model.parameters()),
                      "vocab": model.config.text_config.vocab_size}))
""")


LOGPROB_TOKENS, LOGPROB_VOCAB, LOGPROB_HIDDEN, LOGPROB_CHUNK = 8192, 16384, 64, 256
LOGPROB_SCRIPT = textwrap.dedent(f"""
    import json, resource, sys
    import torch
    from visionr1_trainer.grpo.algos import chunked_logprobs_and_entropy, token_logprobs_and_entropy
    torch.set_num_threads(1)
    def run(h, w, t, chunked):
        if chunked:
            lp, _ = chunked_logprobs_and_entropy(h, w, t, 1.0, chunk_tokens={LOGPROB_CHUNK})
        else:
            lp, _ = token_logprobs_and_entropy(torch.nn.functional.linear(h, w), t, 1.0)
        lp.sum().backward()
    make = lambda n: (torch.randn(1, n, {LOGPROB_HIDDEN}).requires_grad_(),
                      (0.1 * torch.randn({LOGPROB_VOCAB}, {LOGPROB_HIDDEN})).requires_grad_(),
                      torch.randint(0, {LOGPROB_VOCAB}, (1, n)))
    chunked = sys.argv[1] == "logprobs-chunked"
    run(*make(8), chunked)
    h, w, t = make({LOGPROB_TOKENS})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run(h, w, t, chunked)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"delta": after - before, "params": 0, "vocab": {LOGPROB_VOCAB}}}))
""")


# Model states under the project's engines (grpo/engine.py): the resident anonymous memory a
# rank adds from before the engine is made to after one training step (steady state).
STATES_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    from visionr1_trainer.distributed import init_distributed
    from visionr1_trainer.grpo.engine import EngineSpec, make_engine
    from visionr1_trainer.models.loading import load_model_config
    def anon():  # file-backed pages (libraries, mmapped weights) excluded
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    zero, path = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    env = init_distributed()
    def build():  # random weights from the config: partitioned as built under ZeRO-3
        from transformers import AutoModelForImageTextToText
        return AutoModelForImageTextToText.from_config(load_model_config(path), dtype=torch.bfloat16)
    gc.collect()
    base = anon()
    engine = make_engine(build, lambda: load_model_config(path), env, EngineSpec(zero, "bf16", 1, 1.0, 1e-4))
    ids = torch.randint(20, 200, (1, 32))
    out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    engine.backward(out.loss, last=True)
    engine.step()
    del out
    gc.collect()
    print(json.dumps({"rank": env.rank, "delta": anon() - base}))
""")
STATES_RUNS = ((0, 1), (2, 2), (3, 2))  # (ZeRO stage, ranks): the torch engine, then DeepSpeed
STATES_SIZES = (512, 1024)  # hidden sizes of two 8-layer models: the slope cancels fixed overheads


def measure_states(zero: int, ranks: int, model_dir: str) -> list[int]:
    """Each rank's steady-state bytes for the engine at ``zero`` over ``ranks`` CPU ranks (gloo)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": str(2**20), "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", STATES_SCRIPT, str(zero), model_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return [json.loads(o.strip().splitlines()[-1])["delta"] for o in outs]


def check_states(work: str) -> list[dict]:
    """Measured bytes per parameter (slope over two model sizes) against the model's."""
    from transformers import AutoModelForImageTextToText

    from visionr1_trainer.models.tiny import build_tiny_vlm

    dirs, params = [], []
    for hidden in STATES_SIZES:
        path = build_tiny_vlm(os.path.join(work, f"h{hidden}"), hidden_size=hidden, layers=8)
        dirs.append(str(path))
        params.append(sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(path).parameters()))
    rows = []
    for zero, ranks in STATES_RUNS:
        per_size = [measure_states(zero, ranks, d) for d in dirs]
        means = [statistics.mean(m) for m in per_size]
        slope = (means[1] - means[0]) / (params[1] - params[0])
        predicted = sum(model_states(1, ranks, zero, False, False).values())  # bytes per parameter
        rows.append({"what": f"states ZeRO-{zero}, {ranks} rank(s)", "params": params, "measured_bytes": per_size,
                     "measured_bytes_per_param": slope, "predicted_bytes_per_param": predicted,
                     "ratio": slope / predicted,
                     "fixed_mib": (means[1] - slope * params[1]) / 2**20})
    return rows


def measure(mode: str, tokens: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # freed tensors leave RSS at once
    script = LOGPROB_SCRIPT if mode.startswith("logprobs") else CHECK_SCRIPT
    out = subprocess.run([sys.executable, "-c", script, mode, str(tokens), json.dumps(CHECK_SHAPE)],
                         capture_output=True, text=True, check=True, env=env, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_predictions(mode: str, tokens: int, params: int, vocab: int) -> float:
    """The model's prediction (bytes) for one ``measure`` run, in fp32 as the CPU run is."""
    c = CHECK_SHAPE
    kv = c["kv_heads"] * c["hidden"] // c["heads"]
    if mode == "adam":
        return 8 * params  # m and v; the fp32 weights are their own master copy on CPU
    if mode.startswith("logprobs"):
        chunk = LOGPROB_CHUNK if mode == "logprobs-chunked" else None
        return logprob_bytes(LOGPROB_TOKENS, LOGPROB_VOCAB, chunk, logit_bytes=4)
    acts = activations(tokens, c["layers"], c["hidden"], kv, c["intermediate"], mode == "checkpointed", 4)
    return acts + logprob_bytes(tokens, vocab, None, logit_bytes=4)


CHECK_MODES = ("full", "checkpointed", "adam", "logprobs-full", "logprobs-chunked")


def check(repeats: int, tokens: int) -> list[dict]:
    rows = []
    for mode in CHECK_MODES:
        runs = [measure(mode, tokens) for _ in range(repeats)]
        measured = [r["delta"] for r in runs]
        predicted = check_predictions(mode, tokens, runs[0]["params"], runs[0]["vocab"])
        rows.append({"what": mode, "tokens": LOGPROB_TOKENS if mode.startswith("logprobs") else tokens, "params": runs[0]["params"], "vocab": runs[0]["vocab"],
                     "predicted_mib": predicted / 2**20, "measured_mib": [m / 2**20 for m in measured],
                     "ratio": statistics.median(measured) / predicted})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table")
    c = sub.add_parser("check")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--tokens", type=int, default=4096)
    c.add_argument("--out", default="bench/results/memory_check.json")
    args = parser.parse_args(argv)
    if args.command == "table":
        columns = {
            "recommended (ZeRO-3, ckpt, chunked, ref sharded)": Settings(ranks=8),
            "GRPO micro-batch 1": Settings(ranks=8, micro_batch=1),
            "no activation ckpt": Settings(ranks=8, checkpointing=False),
            "unchunked log-probs": Settings(ranks=8, chunk=None),
            "unsharded reference": Settings(ranks=8, reference_partitioned=False),
            "before issue 12 (none of these)": Settings(ranks=8, checkpointing=False, chunk=None,
                                                        reference_partitioned=False),
        }
        print(table(columns))
        print()
        print(vllm_table())
        print()
        print(breakdown(QWEN25_VL["7B"], Settings(ranks=8), 8192, 8))
        return
    import tempfile

    rows = check(args.repeats, args.tokens)
    states = check_states(tempfile.mkdtemp(prefix="memory-check-"))
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
              "method": "ru_maxrss delta in a fresh process, MALLOC_MMAP_THRESHOLD_=1MiB, after a warm-up step",
              "rows": rows,
              "states_method": "RssAnon delta per rank from before make_engine to after one step (gloo, "
                               "DS_ACCELERATOR=cpu, bf16), slope over two model sizes",
              "states": states}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    for r in states:
        print(f"{r['what']}: {r['measured_bytes_per_param']:.2f} bytes/parameter measured, "
              f"{r['predicted_bytes_per_param']:.2f} predicted (ratio {r['ratio']:.2f}), fixed {r['fixed_mib']:.0f} MiB")
    for r in rows:
        print(f"{r['what']:>16}: predicted {r['predicted_mib']:.0f} MiB, measured "
              f"{min(r['measured_mib']):.0f}-{max(r['measured_mib']):.0f} MiB, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
