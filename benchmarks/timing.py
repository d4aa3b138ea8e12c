"""Medians of interleaved repeats: each round runs every variant once, so machine noise hits them alike."""

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
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_of(run: Callable[[], object], repeats: int) -> float:
    return interleaved({"x": run}, repeats, warmup=0)["x"]
