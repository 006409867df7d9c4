"""Statistics of a bridged data set: what went in, what was kept and why the rest was not.

Besides the counts, the paper's measure of CoT quality: self-reflection markers per
sample ("Wait" appears 585K times in Vision-R1-cold's 200K samples, 2.3K times in
LLaVA-CoT), and the distribution of reasoning lengths. ``self_reflection.wait_total`` and
``wait_per_sample`` are the paper's figure for this data set: occurrences of the word
"Wait" in the kept samples' target texts (what SFT trains on), in total and per sample;
``by_marker`` counts a wider set of markers, case-insensitively, in the reasoning.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

# Self-reflection markers, counted case-insensitively on word boundaries.
REFLECTION_MARKERS: dict[str, re.Pattern] = {
    "wait": re.compile(r"\bwait\b", re.IGNORECASE),
    "hmm": re.compile(r"\bhmm+\b", re.IGNORECASE),
    "let me check": re.compile(r"\blet me (?:double[- ])?check\b", re.IGNORECASE),
    "let me verify": re.compile(r"\blet me (?:re-?)?verify\b", re.IGNORECASE),
    "double-check": re.compile(r"\bdouble[- ]check", re.IGNORECASE),
    "re-examine": re.compile(r"\bre-?examine\b|\blet me think again\b|\blet me reconsider\b", re.IGNORECASE),
    "alternatively": re.compile(r"\balternatively\b", re.IGNORECASE),
}


# The paper's count: the word "Wait" as R1 writes it (capitalised), not "await" or "waiting".
PAPER_WAIT = re.compile(r"\bWait\b")


def wait_count(text: str) -> int:
    """Occurrences of "Wait" in ``text``: the self-reflection count of the paper (Sec. 3.1)."""
    return len(PAPER_WAIT.findall(text))


def reflection_counts(text: str) -> dict[str, int]:
    """Occurrences of each self-reflection marker in ``text``."""
    return {name: len(pattern.findall(text)) for name, pattern in REFLECTION_MARKERS.items()}


def distribution(values: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """Mean, quantiles and an equal-width histogram of ``values`` (empty-safe)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    low, high = ordered[0], ordered[-1]
    width = (high - low) / bins or 1
    counts = [0] * bins
    for v in ordered:
        counts[min(bins - 1, int((v - low) / width))] += 1
    return {
        "count": len(ordered), "mean": round(sum(ordered) / len(ordered), 2),
        "min": float(low), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": float(high),
        "histogram": {"edges": [round(low + i * width, 2) for i in range(bins + 1)], "counts": counts},
    }


def dataset_stats(
    kept: Iterable[dict[str, Any]],
    samples_in: int,
    dropped: dict[str, int],
    source: dict[str, Any],
    generators: dict[str, dict[str, Any]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The ``stats.json`` written inside the ``dataset`` artifact.

    ``kept`` are the kept samples' records (``reasoning_chars``, ``reasoning_words``,
    ``reflection``, ``response``: the target text); ``dropped`` counts drops by reason.
    """
    kept = list(kept)
    per_sample = [sum(k["reflection"].values()) for k in kept]
    waits = [wait_count(k.get("response", "")) for k in kept]
    by_marker = {name: sum(k["reflection"].get(name, 0) for k in kept) for name in REFLECTION_MARKERS}
    rule = any(g.get("backend") == "rule" for g in generators.values())
    return {
        "samples_in": samples_in,
        "kept": len(kept),
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "dropped_total": sum(dropped.values()),
        "keep_rate": round(len(kept) / samples_in, 4) if samples_in else 0.0,
        "source": source,
        "teacher": "rule-based (synthetic tasks only)" if rule else "models",
        "generators": generators,
        "reasoning_chars": distribution([k["reasoning_chars"] for k in kept]),
        "reasoning_words": distribution([k["reasoning_words"] for k in kept]),
        "self_reflection": {
            "markers_total": sum(per_sample),
            "per_sample_mean": round(sum(per_sample) / len(kept), 3) if kept else 0.0,
            "samples_with_any": sum(1 for n in per_sample if n),
            "wait_total": sum(waits),
            "wait_per_sample": round(sum(waits) / len(kept), 3) if kept else 0.0,
            "wait_distribution": distribution(waits),
            "by_marker": by_marker,
        },
        "settings": settings,
    }
