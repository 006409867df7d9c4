"""The ``hf`` backend: generation with transformers, on CPU or a GPU.

A vision-language model (a config with ``vision_config``) is loaded with
``models.loading.load_vlm`` and prompted through ``models.vlm.encode_prompts``, so the
image tokens are expanded exactly as in training; a text-only model (the reasoning
role) through ``AutoModelForCausalLM`` and its chat template. Requests run in batches of
``concurrency`` prompts.
"""

from __future__ import annotations

from typing import Any, Sequence

from . import Completion, Generator, GeneratorContext, Progress, Request, register


class HFGenerator(Generator):
    kind = "hf"

    def __init__(self, spec, ctx: GeneratorContext):
        import torch

        from ...checkpoint import resolve_model_dir

        self.spec, self.ctx = spec, ctx
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.source = resolve_model_dir(spec.model, ctx.storage_spec(), ctx.work_dir)
        self.model, self.tokenizer, self.image_processor = _load(self.source, self.device)
        self.model.eval()
        self.generator = torch.Generator(device=self.device).manual_seed(ctx.seed)

    def generate(self, requests: Sequence[Request], progress: Progress = None) -> list[Completion]:
        out: list[Completion] = []
        step = max(1, self.spec.concurrency)
        for start in range(0, len(requests), step):
            out.extend(self._batch(requests[start:start + step]))
            if progress:
                progress(len(requests[start:start + step]))
        return out

    def _batch(self, batch: Sequence[Request]) -> list[Completion]:
        import torch

        from ...data.formats import load_rgb
        from ...models.vlm import IMAGE_TOKEN, encode_prompts

        limit = max(1, _context_length(self.model) - self.spec.max_tokens)
        if self.image_processor is None:
            if any(r.image_paths for r in batch):
                return [Completion(None, error="text_only_model_got_images") for _ in batch]
            enc = _encode_text(self.tokenizer, [r.prompt for r in batch], limit)
        else:
            images = [[load_rgb(p) for p in r.image_paths] for r in batch]
            enc = encode_prompts(self.tokenizer, self.image_processor, [r.prompt for r in batch],
                                 images, max_prompt_length=limit)
        results = [Completion(None, error="prompt_too_long") for _ in batch]
        if not enc.kept:
            return results
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        inputs = {k: v.to(self.device) for k, v in enc.model_inputs(image_token_id).items()}
        sample = self.spec.temperature > 0
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        with torch.no_grad():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.spec.max_tokens, do_sample=sample,
                temperature=self.spec.temperature if sample else None,
                top_p=self.spec.top_p if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        prompt_len = enc.input_ids.shape[1]  # left-padded: completions start here
        new = ids[:, prompt_len:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for index, text, finish in zip(enc.kept, texts, finish_reasons(new, self.spec.max_tokens, stop_ids(self))):
            results[index] = Completion(text, finish_reason=finish)
        return results

    def describe(self) -> dict[str, Any]:
        return {"backend": "hf", "model": self.spec.model, "max_tokens": self.spec.max_tokens,
                "temperature": self.spec.temperature, "top_p": self.spec.top_p}

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stop_ids(gen) -> set[int]:
    """Token ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(getattr(gen.model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if gen.tokenizer.eos_token_id is not None:
        ids.add(gen.tokenizer.eos_token_id)
    return ids


def finish_reasons(new_tokens, max_tokens: int, stops: set[int]) -> list[str]:
    """Per row of ``new_tokens`` (B, N): ``stop`` if it holds a stop token, else ``length``
    when it used the whole budget (cut mid-generation), else ``stop``."""
    out = []
    for row in new_tokens.tolist():
        ended = any(t in stops for t in row)
        out.append("length" if not ended and len(row) >= max_tokens else "stop")
    return out


def _load(source: str, device: str):
    """(model, tokenizer, image_processor or None) for a VLM or a text-only model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ...models.loading import load_vlm

    if hasattr(AutoConfig.from_pretrained(source), "vision_config"):
        return load_vlm(source, "auto", "sdpa", device)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


def _encode_text(tokenizer, prompts: Sequence[str], max_prompt_length: int):
    """Chat prompts for a text-only model (string content: its template expects no parts)."""
    from ...models.vlm import EncodedPrompts

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    kept = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    dropped = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    if not kept:
        return EncodedPrompts(None, None, None, None, [], dropped)
    enc = tokenizer([texts[i] for i in kept], return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    return EncodedPrompts(enc["input_ids"], enc["attention_mask"], None, None, kept, dropped)


def _context_length(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return int(getattr(config, "max_position_embeddings", 32768) or 32768)


@register("hf")
def _make(spec, ctx) -> HFGenerator:
    return HFGenerator(spec, ctx)
