"""Medians of interleaved repeats: each round runs every variant once, so machine noise hits them alike, and the
order rotates from round to round, so no variant always runs right after the same other one."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, warm-up calls excluded."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_of(run: Callable[[], object], repeats: int) -> float:
    return interleaved({"x": run}, repeats, warmup=0)["x"]


def alternating(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``first`` and of ``second``, called in turn (undo, redo, ...)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, samples in zip((first, second), times):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
