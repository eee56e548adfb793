"""Timing on a shared, noisy machine: run the candidates in alternation (A, B, A, B ...) so that drifts
in the machine's load hit all of them, and compare medians. Only ratios measured this way mean anything."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def alternate(runs: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Call every runner once per round, in the dict's order: ``{name: [result of round 1, 2, ...]}``."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    out: dict[str, list[T]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            out[name].append(run())
    return out


def median_ratio(base: list[float], candidate: list[float]) -> dict[str, float]:
    """Medians of two alternated series and candidate / base (e.g. tokens/s: > 1 is faster)."""
    a, b = statistics.median(base), statistics.median(candidate)
    return {"base": a, "candidate": b, "ratio": b / a}
