"""What each local stage was run from, so a stage never counts as done on stale inputs.

A stage's inputs are its own settings (its stage config, less the per-attempt fields)
and the commits of the stages whose outputs it reads: the SFT stage reads the bridge's
data set (``dataUri``), a PTST stage the model before it (``initUri``), the eval stage
every model it scores (``models``). Which stages those are is read off the config: a
value that names another stage's output URI. A commit is identified by the digest of
its commit marker (``_COMMITTED.json``: file hashes and commit time), so a stage that
ran again has a new commit even when its settings did not change.

The executor writes ``<run dir>/provenance/<stage>.json`` as a stage starts (its inputs,
no commit yet) and again once it committed (with the digest of its own commit). On a
later run a stage whose recorded inputs differ from the current ones is stale: a
committed one runs again from scratch, and then so does every stage that reads it (their
recorded upstream commit no longer matches); an interrupted one starts afresh instead of
resuming from checkpoints made under other inputs. ``changes`` names what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionr1_trainer.config import FINAL_ARTIFACT
from visionr1_trainer.storage import COMMIT_MARKER

from ..plan import StagePlan, config_strings

PROVENANCE_DIR = "provenance"
# Per-attempt details of a stage config that do not change what the stage computes.
VOLATILE = ("attempt", "metricsPort", "terminationMessagePath")


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve()


def settings(plan: StagePlan) -> dict[str, Any]:
    """The stage config as JSON, less the fields that change with every attempt."""
    return {k: v for k, v in plan.config_json().items() if k not in VOLATILE}


def upstream(plan: StagePlan, plans: list[StagePlan]) -> list[StagePlan]:
    """The earlier stages whose output this stage's config names (the ones it reads)."""
    own = settings(plan)
    own.pop("outputUri", None)
    names = set(config_strings(own))
    found = []
    for other in plans:
        if other is plan:
            break
        prefix = other.output_uri.rstrip("/")
        if any(s == prefix or s.startswith(prefix + "/") for s in names):
            found.append(other)
    return found


def commit_id(plan: StagePlan) -> str | None:
    """Digest of the stage's final commit marker; None while it is not committed."""
    marker = _local(plan.output_uri) / FINAL_ARTIFACT[plan.kind] / COMMIT_MARKER
    try:
        return hashlib.sha256(marker.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


@dataclass(frozen=True)
class Inputs:
    settings: dict[str, Any]
    upstream: dict[str, str | None]  # stage name -> commit id

    def digest(self) -> str:
        text = json.dumps({"settings": self.settings, "upstream": self.upstream}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "upstream": self.upstream}


def current(plan: StagePlan, plans: list[StagePlan]) -> Inputs:
    return Inputs(settings(plan), {p.name: commit_id(p) for p in upstream(plan, plans)})


@dataclass(frozen=True)
class Record:
    """What ``<run dir>/provenance/<stage>.json`` holds."""

    inputs: Inputs
    commit: str | None  # the stage's own commit made from these inputs; None until it commits


def record_path(directory: Path, name: str) -> Path:
    return directory / PROVENANCE_DIR / f"{name}.json"


def load(directory: Path, name: str) -> Record | None:
    """The stage's record; None when there is none (or it cannot be read, said as None too:
    the caller treats an unreadable record as a missing one)."""
    try:
        data = json.loads(record_path(directory, name).read_text())
        return Record(Inputs(dict(data["inputs"]["settings"]), dict(data["inputs"]["upstream"])),
                      data.get("commit"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(directory: Path, name: str, inputs: Inputs, commit: str | None) -> None:
    path = record_path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"inputs": inputs.to_json(), "commit": commit, "digest": inputs.digest()},
                              indent=2, sort_keys=True))
    os.replace(tmp, path)


def _diff(before: Any, after: Any, path: str, out: list[str]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            _diff(before.get(key), after.get(key), f"{path}.{key}" if path else str(key), out)
    elif before != after:
        out.append(path or "settings")


def changes(before: Inputs, after: Inputs) -> list[str]:
    """What differs, for a reader: changed settings by field, upstream stages by name."""
    out: list[str] = []
    _diff(before.settings, after.settings, "", out)
    for name in sorted(set(before.upstream) | set(after.upstream)):
        old, new = before.upstream.get(name), after.upstream.get(name)
        if old == new:
            continue
        if name not in before.upstream:
            out.append(f"now reads stage {name}")
        elif name not in after.upstream:
            out.append(f"no longer reads stage {name}")
        else:
            out.append(f"stage {name} was committed anew")
    return out
