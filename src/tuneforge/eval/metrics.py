"""Task metrics. Each is checked in tests against a reference library or hand-worked numbers."""

from __future__ import annotations


def normalize_exact(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share (0-100) of predictions equal to their reference after trimming whitespace."""
    if not references:
        return 0.0
    hits = sum(
        normalize_exact(p) == normalize_exact(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return 100.0 * hits / len(references)
