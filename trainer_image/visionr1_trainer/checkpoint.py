"""Resumable checkpoints and final models, committed through the storage layer.

Layout under a stage's ``output_uri``:

    checkpoints/step-00000020/   model weights, optimizer + scheduler state, RNG, step
    model/                        the final model in Hugging Face format (the next stage's input)

Each is an artifact: visible only once its commit marker is written, so a stage killed
mid-save resumes from the previous checkpoint, never from a torn one. Only rank 0 of a
distributed stage writes (every rank holds the same replicated weights under DDP).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

from .config import StorageSpec
from .storage import LocalStore, Store, StorageError, open_store

CHECKPOINTS = "checkpoints"
MODEL = "model"
STATE_FILE = "trainer_state.pt"


def open_stage_store(uri: str, storage: StorageSpec) -> Store:
    """The store rooted at ``uri``, with the run's S3 endpoint and region."""
    return open_store(uri, endpoint_url=storage.endpoint, region=storage.region)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


# --- RNG state: restored on resume so a resumed run samples what an unbroken one would ---


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            self.store.delete(name)

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

    model.save_pretrained(directory / "model", state_dict=state_dict)
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
    import torch

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), state.get("extra") or {}


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
