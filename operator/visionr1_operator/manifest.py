"""Read VisionR1Run manifests from YAML files into validated models.

Every problem becomes one ``(field path, message)`` pair, the way ``kubectl`` reports
them (``spec.stages.ptst[1].numGenerations: ...``): YAML syntax, wrong apiVersion or
kind, unknown fields, bad quantities and URIs, and the cross-field rules alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from visionr1_trainer.config import WIRE, format_errors

from .api import API_VERSION, KIND, VisionR1Run


@dataclass
class ManifestError(Exception):
    """A manifest that does not describe a valid VisionR1Run."""

    source: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        return [f"{self.source}: {path}: {msg}" for path, msg in self.problems]


def validate_document(doc: Any, source: str = "<manifest>") -> VisionR1Run:
    """Validate one parsed YAML/JSON document as a VisionR1Run."""
    if not isinstance(doc, dict):
        kind = "empty document" if doc is None else f"a {type(doc).__name__}"
        raise ManifestError(source, [("<root>", f"expected a mapping (a Kubernetes object), got {kind}")])
    head = []
    if doc.get("apiVersion") != API_VERSION:
        head.append(("apiVersion", f"must be {API_VERSION!r}, got {doc.get('apiVersion')!r}"))
    if doc.get("kind") != KIND:
        head.append(("kind", f"must be {KIND!r}, got {doc.get('kind')!r}"))
    if head:  # another kind of object: its fields would only add noise
        raise ManifestError(source, head)
    try:
        # strict: no "10" -> 10 or "true" -> True coercion, which the API server's
        # schema validation would refuse; what passes here passes kubectl apply.
        return VisionR1Run.model_validate(doc, strict=True, **WIRE)
    except ValidationError as exc:
        raise ManifestError(source, format_errors(exc)) from None


def load_documents(path: str | Path) -> list[Any]:
    """Parse every YAML document of a file; syntax errors name the line."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(source, [("<file>", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(source, [("<file>", f"cannot read: {exc}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(source, [(where, f"YAML syntax error: {problem}")]) from None
    if not docs:
        raise ManifestError(source, [("<file>", "no YAML document in the file")])
    return docs


def load_runs(path: str | Path) -> list[VisionR1Run]:
    """All runs of a (possibly multi-document) manifest file."""
    docs = load_documents(path)
    runs, problems = [], []
    for i, doc in enumerate(docs):
        # In a multi-document file, say which document a problem is in.
        prefix = f"document {i + 1}: " if len(docs) > 1 else ""
        try:
            runs.append(validate_document(doc, str(path)))
        except ManifestError as err:
            problems += [(prefix + p, m) for p, m in err.problems]
    if problems:
        raise ManifestError(str(path), problems)
    return runs


def load_run(path: str | Path) -> VisionR1Run:
    """Exactly one run from a manifest file."""
    runs = load_runs(path)
    if len(runs) != 1:
        raise ManifestError(str(path), [("<file>", f"expected one VisionR1Run, found {len(runs)}")])
    return runs[0]
