"""LoRA adapters (Hu et al., arXiv 2106.09685) through peft, merged into the committed model.

With ``lora.enabled`` (``stages.sft.lora``, ``stages.grpo.lora``) a stage trains low-rank
adapters on the language model's linear layers instead of every weight: each targeted
``W`` (out, in) stays frozen and the layer computes ``W x + (alpha / r) B A dropout(x)``,
``A`` (r, in) random, ``B`` (out, r) zero at the start (peft's default initialisation).

The adapters are injected in place (``peft.inject_adapter_in_model``: no ``PeftModel``
wrapper), so the stage's engine, ``LogprobModel`` and DeepSpeed see an ordinary module
whose only trainable parameters are the adapters (and, in SFT, vision parts its freeze
settings leave trainable). Names change only inside the targeted layers:
``...q_proj.weight`` becomes ``...q_proj.base_layer.weight`` beside
``...q_proj.lora_A.default.weight`` and ``...q_proj.lora_B.default.weight``.

Saving: ``merged_state_dict`` turns such a state dict back into the plain model's
(``W + scale * B @ A`` in float32, cast to ``W``'s dtype; adapter keys dropped), so the
committed ``model`` artifact (and a checkpoint's ``model/``) loads with the ordinary
loader, in the next stage, in eval and in vLLM. A checkpoint also keeps the trainable
tensors unmerged (``ADAPTER_FILE``): a resumed stage loads the frozen base from the
stage's starting model, injects the adapters and loads them, so it continues exactly.

Pure helpers, no stage logic; the hooks are in sft/train.py, grpo/trainer.py,
grpo/engine.py and checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

ADAPTER_FILE = "lora_trainable.safetensors"  # in a checkpoint: the trainable tensors, unmerged
ADAPTER_NAME = "default"
_BASE = ".base_layer."
_A = f".lora_A.{ADAPTER_NAME}.weight"
_B = f".lora_B.{ADAPTER_NAME}.weight"


def is_adapter_key(name: str) -> bool:
    """True for a LoRA adapter tensor's name (``lora_A`` / ``lora_B``, any adapter)."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_dropout." in name


def target_module_names(model: torch.nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name part is in ``targets``,
    outside the vision tower (``visual``): the layers that get adapters."""
    wanted = set(targets)
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and parts[-1] in wanted and "visual" not in parts:
            names.append(name)
    return names


def apply_lora(model: torch.nn.Module, settings, keep_trainable: Callable[[str], bool] = lambda name: False,
               field: str = "lora") -> dict[str, int]:
    """Inject adapters into ``model`` in place; freeze every other parameter except those
    ``keep_trainable(name)`` says to leave as they are. Returns parameter counts.

    ``settings``: a ``LoraSettings`` (rank, alpha, dropout, target_modules). Raises
    ``UnusableSetting`` (exit 2) naming ``field.targetModules`` when no layer matches.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from ..runtime import UnusableSetting

    names = target_module_names(model, settings.target_modules)
    if not names:  # a stage exits 2 with this message
        raise UnusableSetting(f"{field}.targetModules: no linear layer of the language model is named any of "
                         f"{list(settings.target_modules)}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    # peft freezes every non-adapter parameter: what was trainable is put back where kept.
    trainable = {id(p) for name, p in model.named_parameters() if p.requires_grad and keep_trainable(name)}
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name) or id(param) in trainable)
    return parameter_counts(model)


def adapt_for_stage(model: torch.nn.Module, settings, checkpoint_dir: Path | None, field: str,
                    keep_trainable: Callable[[str], bool] = lambda name: False) -> torch.nn.Module:
    """A stage's model with ``settings`` applied: unchanged when LoRA is off; else adapters
    injected (``apply_lora``) and, resuming from ``checkpoint_dir``, its trainable tensors
    loaded. ``model`` must then be the stage's starting model (the frozen base)."""
    if not settings.enabled:
        return model
    apply_lora(model, settings, keep_trainable, field)
    if checkpoint_dir is not None:
        load_trainable(model, Path(checkpoint_dir) / ADAPTER_FILE)
    return model


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``trainable``, ``adapter`` and ``total`` parameter counts (shared tensors once)."""
    seen, counts = set(), {"trainable": 0, "adapter": 0, "total": 0}
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if param.requires_grad else 0
        counts["adapter"] += param.numel() if is_adapter_key(name) else 0
    return counts


def lora_scaling(model: torch.nn.Module) -> dict[str, float]:
    """Module name -> its adapter's scale (alpha / r) for every LoRA layer; ``{}`` without LoRA."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and ADAPTER_NAME in scaling and hasattr(module, "lora_A"):
            out[name] = float(scaling[ADAPTER_NAME])
    return out


def merged_state_dict(state_dict: dict[str, torch.Tensor], scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from one with adapters: for each LoRA layer ``m``,
    ``m.weight = m.base_layer.weight + scaling[m] * lora_B (out, r) @ lora_A (r, in)``
    (float32, then ``W``'s dtype), ``m.base_layer.bias`` -> ``m.bias``; adapter keys dropped.
    A state dict without adapters comes back unchanged (a new dict)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_adapter_key(key):
            continue
        if _BASE not in key:
            out[key] = value
            continue
        module, leaf = key.split(_BASE, 1)
        if leaf == "weight" and module in scaling:
            a, b = state_dict[module + _A], state_dict[module + _B]
            delta = scaling[module] * (b.detach().float() @ a.detach().float())
            value = (value.detach().float() + delta.to(value.device)).to(value.dtype)
        out[f"{module}.{leaf}"] = value
    return out


def merged_parameters(parameters: Iterator[tuple[str, torch.Tensor]], scaling: dict[str, float]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``merged_state_dict`` over a stream of ``(name, tensor)`` (an engine's
    ``iter_full_parameters``, in ``named_parameters`` order), for a rollout engine's
    weight sync: each LoRA layer's merged weight once its ``A`` and ``B`` have passed."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in parameters:
        if name.endswith(_A) or name.endswith(_B):
            module, part = (name[: -len(_A)], "a") if name.endswith(_A) else (name[: -len(_B)], "b")
        elif _BASE in name:
            module, leaf = name.split(_BASE, 1)
            if leaf != "weight" or module not in scaling:
                yield f"{module}.{leaf}", tensor
                continue
            part = "weight"
        elif is_adapter_key(name):
            continue
        else:
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor.detach().clone()  # valid past the next item (ZeRO-3 gathers release)
        if len(parts) == 3:
            del pending[module]
            merged = merged_state_dict({f"{module}{_BASE}weight": parts["weight"], module + _A: parts["a"],
                                        module + _B: parts["b"]}, {module: scaling[module]})
            yield f"{module}.weight", merged[f"{module}.weight"]
    if pending:
        raise ValueError(f"LoRA layers without their base weight or adapters: {sorted(pending)[:3]}")


def trainable_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` that train (adapters, unfrozen vision parts), as
    contiguous CPU copies: what a checkpoint keeps unmerged to resume from."""
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items() if k in names}


def save_trainable(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Put a checkpoint's trainable tensors (``save_trainable``) into an adapted model."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the checkpoint has no LoRA tensors (was it saved with lora.enabled?)")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise ValueError(f"{path}: tensors that are not this model's: {unknown[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))

