"""Resumable checkpoints and final models, committed through the storage layer.

Layout under a stage's ``output_uri``:

    checkpoints/step-00000020/   model weights, replicated optimizer state, rank 0's RNG, step
    shards/step-00000020/rank-00001/   one rank's own state: its RNG and, under ZeRO, its
                                  optimizer partition (fp32 master weights, Adam moments)
    model/                        the final model in Hugging Face format (the next stage's input)

Each is an artifact: visible only once its commit marker is written, so a stage killed
mid-save resumes from the previous checkpoint, never from a torn one. Every rank commits
its shard first; after a barrier rank 0 commits the checkpoint itself, last, so a
committed checkpoint always has all its shards. Trainer state is saved in forms that
``torch.load(..., weights_only=True)`` reads (tensors, numbers, strings, containers).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

from .config import StorageSpec
from .storage import LocalStore, Store, StorageError, open_store

CHECKPOINTS = "checkpoints"
SHARDS = "shards"
MODEL = "model"
STATE_FILE = "trainer_state.pt"
RANK_FILE = "rank_state.pt"


def open_stage_store(uri: str, storage: StorageSpec) -> Store:
    """The store rooted at ``uri``, with the run's S3 endpoint and region."""
    return open_store(uri, endpoint_url=storage.endpoint, region=storage.region)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


def shard_name(step: int, rank: int) -> str:
    return f"{SHARDS}/step-{step:08d}/rank-{rank:05d}"


# --- RNG state: restored on resume so a resumed run samples what an unbroken one would ---


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and tuples (``weights_only`` loads them)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """Python's ``random.setstate`` wants tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class _OptimizerState:
    """A saved optimizer state with the ``state_dict()`` call ``save_training_state`` makes."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


# --- the manager ---------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores a stage's training state under ``<output_uri>/checkpoints``."""

    def __init__(self, output_uri: str, storage: StorageSpec, work_dir: str | Path, keep_last: int = 2):
        self.store = open_stage_store(output_uri, storage)
        self.work_dir = Path(work_dir)
        self.keep_last = keep_last

    def latest(self) -> str | None:
        return self.store.latest_committed(CHECKPOINTS)

    def commit(self, name: str, write: Callable[[Path], None], metadata: dict | None = None) -> str:
        """Let ``write`` fill a fresh local directory, then commit it as artifact ``name``."""
        tmp = self.work_dir / "pending" / name.replace("/", "_")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            return self.store.commit_dir(tmp, name, metadata)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save(
        self,
        step: int,
        model,
        optimizer,
        scheduler=None,
        extra: dict | None = None,
        processor_parts: tuple = (),
        extra_files: dict[str, Path] | None = None,
        state_dict: dict | None = None,
    ) -> str:
        """Commit ``checkpoints/step-<step>``; keep only the newest ``keep_last``.

        ``extra_files`` (name in the checkpoint -> local file) travel with it, e.g. the
        metrics log, so a resumed stage on a fresh pod continues the same log.
        """

        def write(directory: Path) -> None:
            save_training_state(directory, model, optimizer, scheduler, step, extra or {}, state_dict)
            for part in processor_parts:
                part.save_pretrained(directory / "model")
            for name, path in (extra_files or {}).items():
                if Path(path).exists():
                    shutil.copy(path, directory / name)

        uri = self.commit(checkpoint_name(step), write, {"step": step})
        self.prune()
        return uri

    def prune(self) -> None:
        names = self.store.list_committed(CHECKPOINTS)
        for name in names[: max(0, len(names) - self.keep_last)]:
            self.store.delete(name)  # the checkpoint's marker goes first: its shards are then unused
            for shard in self.store.list_committed(f"{SHARDS}/{name.rsplit('/', 1)[1]}"):
                self.store.delete(shard)

    def save_ranked(self, step: int, engine, env, extra_files: dict[str, Path] | None = None) -> str | None:
        """Every rank's part of checkpoint ``step``; a collective (every rank calls it).

        Each rank commits its shard (RNG, and its ZeRO optimizer partition), then rank 0
        commits the checkpoint (weights, step, a replicated optimizer), marker last.
        Returns the checkpoint's URI on rank 0, None elsewhere.
        """
        import torch

        from .distributed import barrier

        weights = engine.full_state_dict()  # a collective under ZeRO-3
        shard = {"rng": rng_state(),
                 "optimizer": None if engine.optimizer_state_replicated else engine.optimizer_state()}
        self.commit(shard_name(step, env.rank), lambda d: torch.save(shard, d / RANK_FILE),
                    {"step": step, "rank": env.rank})
        barrier(env)  # every shard is committed before the checkpoint that relies on them
        uri = None
        if env.is_main:
            optimizer = _OptimizerState(engine.optimizer_state()) if engine.optimizer_state_replicated else None
            uri = self.save(step, engine, optimizer, extra={"world_size": env.world_size, **engine.describe()},
                            extra_files=extra_files, state_dict=weights)
        barrier(env)
        return uri

    def load_ranked(self, found: tuple[str, Path], engine, env) -> int:
        """Restore what ``save_ranked`` committed into a freshly built engine; returns the step.

        The weights were loaded with the model. Each rank restores its own RNG and (ZeRO)
        its own optimizer partition; a replicated optimizer comes from the checkpoint.
        """
        name, directory = found
        state = _load(directory / STATE_FILE)
        saved_world = (state.get("extra") or {}).get("world_size", env.world_size)
        if saved_world != env.world_size:
            raise StorageError(f"{name} was saved by {saved_world} ranks; this stage runs {env.world_size} "
                               f"(ZeRO partitions and per-rank RNG cannot be re-split)")
        if engine.optimizer_state_replicated and state.get("optimizer") is not None:
            engine.load_optimizer_state(state["optimizer"])
        step = int(state["step"])
        shard_dir = self._fetch(shard_name(step, env.rank))
        if shard_dir is None:  # a checkpoint from before shards: rank 0's RNG, fresh ZeRO moments
            set_rng_state(state["rng"])
            return step
        shard = _load(shard_dir / RANK_FILE)
        if shard.get("optimizer") is not None:
            engine.load_optimizer_state(shard["optimizer"])
        set_rng_state(shard["rng"])
        return step

    def _fetch(self, name: str) -> Path | None:
        if not self.store.is_committed(name):
            return None
        if isinstance(self.store, LocalStore):
            return self.store.local_path(name)
        local = self.work_dir / "restore" / name.replace("/", "_")
        shutil.rmtree(local, ignore_errors=True)
        return self.store.fetch_dir(name, local)

    def restore_dir(self) -> tuple[str, Path] | None:
        """The newest committed checkpoint as a local directory (None when there is none)."""
        name = self.latest()
        if name is None:
            return None
        if isinstance(self.store, LocalStore):
            return name, self.store.local_path(name)
        local = self.work_dir / "restore" / name.replace("/", "_")
        shutil.rmtree(local, ignore_errors=True)
        return name, self.store.fetch_dir(name, local)

    def load_latest(self, model, optimizer, scheduler=None) -> tuple[int, dict] | None:
        """Restore model, optimizer, scheduler and RNG from the newest checkpoint."""
        found = self.restore_dir()
        if found is None:
            return None
        return load_training_state(found[1], model, optimizer, scheduler)

    def commit_model(self, model, tokenizer=None, image_processor=None, metadata: dict | None = None,
                     state_dict: dict | None = None) -> str:
        """Commit the final model (Hugging Face format) as the artifact ``model``."""

        state_dict, _ = plain_weights(model, state_dict)  # LoRA: merged, no adapter keys

        def write(directory: Path) -> None:
            model.save_pretrained(directory, state_dict=state_dict)
            for part in (tokenizer, image_processor):
                if part is not None:
                    part.save_pretrained(directory)

        return self.commit(MODEL, write, metadata)


def save_training_state(directory: Path, model, optimizer, scheduler, step: int, extra: dict,
                        state_dict: dict | None = None) -> None:
    """Weights (safetensors via save_pretrained) plus everything else needed to resume.

    ``state_dict``: the full weights when ``model`` holds only a shard (DeepSpeed ZeRO-3).
    ``optimizer`` may be None when its state cannot be saved from one rank.
    """
    import torch

    state_dict, trainable = plain_weights(model, state_dict)
    model.save_pretrained(directory / "model", state_dict=state_dict)
    if trainable is not None:  # LoRA: the adapters unmerged too, to resume from (models/lora.py)
        from .models.lora import ADAPTER_FILE, save_trainable

        save_trainable(directory / ADAPTER_FILE, trainable)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra,
        },
        directory / STATE_FILE,
    )


def plain_weights(model, state_dict: dict | None) -> tuple[dict | None, dict | None]:
    """``(weights to save, trainable tensors or None)``. A model with LoRA adapters
    (models/lora.py) saves the plain model's weights, each adapter merged into its layer,
    and keeps its trainable tensors unmerged for a resume; any other model is saved as is."""
    module = getattr(model, "module", model)
    if not hasattr(module, "named_modules"):
        return state_dict, None
    from .models.lora import lora_scaling, merged_state_dict, trainable_state

    scaling = lora_scaling(module)
    if not scaling:
        return state_dict, None
    full = state_dict if state_dict is not None else module.state_dict()
    return merged_state_dict(full, scaling), trainable_state(module, full)


def load_training_state(directory: Path, model, optimizer, scheduler=None) -> tuple[int, dict]:
    """Restore weights into ``model``, then optimizer, scheduler, RNG; returns (step, extra)."""
    from safetensors.torch import load_file

    weights = sorted((directory / "model").glob("*.safetensors"))
    if not weights:
        raise StorageError(f"checkpoint {directory} has no model weights")
    state_dict: dict[str, Any] = {}
    for shard in weights:
        state_dict.update(load_file(shard))
    # Tied embeddings are saved once; strict=False tolerates exactly that omission.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise StorageError(f"checkpoint {directory} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return load_trainer_state(directory, optimizer, scheduler)


def load_trainer_state(directory: Path, optimizer, scheduler=None) -> tuple[int, dict]:
    """Everything but the weights (loaded with ``from_pretrained(directory / "model")``)."""
    state = _load(directory / STATE_FILE)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), state.get("extra") or {}


def _load(path: Path) -> dict[str, Any]:
    """A trainer state file, read with ``weights_only=True`` (no arbitrary objects).

    DeepSpeed's ZeRO optimizer states carry a few plain classes of its own (its loss
    scaler, parameter fragment addresses); those are allowed by name, nothing else.
    """
    import torch

    with torch.serialization.safe_globals(_deepspeed_state_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _deepspeed_state_classes() -> list:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:  # DeepSpeed absent: its states cannot occur
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# --- where a stage's model comes from ---------------------------------------------------------


def resolve_model_dir(source: str, storage: StorageSpec, work_dir: str | Path) -> str:
    """A path or hub id that ``from_pretrained`` can load.

    ``source`` is a hub id (returned as is), a local directory or ``file://`` path of a
    saved model, or a stage's output URI (``file://``, ``s3://``, ``pvc://``) whose
    committed ``model`` artifact is used (fetched to ``work_dir`` when not local).
    """
    if "://" not in source and not source.startswith("/"):
        return source  # a hub id
    store = open_stage_store(source if "://" in source else f"file://{source}", storage)
    if store.is_committed(MODEL):
        if isinstance(store, LocalStore):
            return str(store.local_path(MODEL))
        local = Path(work_dir) / "models" / source.replace("://", "_").replace("/", "_")
        shutil.rmtree(local, ignore_errors=True)
        return str(store.fetch_dir(MODEL, local))
    if isinstance(store, LocalStore) and (store.root / "config.json").is_file():
        return str(store.root)  # a plain saved model directory
    raise StorageError(
        f"{source}: no committed 'model' artifact there"
        + ("" if isinstance(store, LocalStore) else " (models on s3:// must be a stage's committed output)")
    )
