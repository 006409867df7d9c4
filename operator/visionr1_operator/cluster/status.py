"""Status helpers: timestamps, metav1.Conditions, and the merge patch between two statuses. Pure."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from ..api import Condition, VisionR1RunStatus


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC, second precision, as Kubernetes writes it."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> bool:
    """Set one condition in place; True when its status flipped (or it is new and True).

    ``lastTransitionTime`` moves only when the status changes, as metav1.Condition wants,
    so ``kubectl wait`` and GitOps health checks see stable conditions.
    """
    value = "True" if status else "False"
    current = get_condition(conditions, type_)
    if current is None:
        conditions.append(Condition(
            type=type_, status=value, reason=reason, message=message[:32768],
            last_transition_time=timestamp(now), observed_generation=generation,
        ))
        return status
    flipped = current.status != value
    current.status = value
    current.reason = reason
    current.message = message[:32768]
    current.observed_generation = generation
    if flipped:
        current.last_transition_time = timestamp(now)
    return flipped


def status_document(status: VisionR1RunStatus) -> dict[str, Any]:
    """The status as the API stores it: camelCase, no nulls."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``.

    Objects are diffed key by key (a removed key becomes ``null``); lists and scalars are
    replaced whole, as merge patches do. Returns ``{}`` when nothing changed.
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) else value
    return patch


def finished_generation_patch(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The status patch that acknowledges a spec edit on a finished run, or None.

    A run that has Succeeded or Failed has nothing left to do, but ``kubectl wait`` and
    Flux's kstatus keep waiting while a condition's ``observedGeneration`` (or the
    status's) is below ``metadata.generation``: the edit is recorded as observed, and
    nothing else about the run changes. ``body`` is the run as the API serves it.
    """
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    if status.get("phase") not in ("Succeeded", "Failed") or not isinstance(generation, int):
        return None
    conditions = status.get("conditions") or []
    if status.get("observedGeneration") == generation and all(
        c.get("observedGeneration") == generation for c in conditions
    ):
        return None
    # A merge patch replaces a list whole: every condition goes back, only renumbered.
    return {"observedGeneration": generation,
            "conditions": [{**c, "observedGeneration": generation} for c in conditions]}
