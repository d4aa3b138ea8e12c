"""Medians of interleaved repeats: each round runs every variant once, so machine noise hits them alike, and the
order rotates from round to round, so no variant always runs right after the same other one."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext


Variant = Callable[[], object] | tuple[Callable[[], AbstractContextManager], Callable[[], object]]


def _timed(variant: Variant) -> float:
    setting, run = variant if isinstance(variant, tuple) else (nullcontext, variant)
    with setting():  # set-up and tear-down (attaching a delta, say) are not what is timed
        start = time.perf_counter()
        run()
        return time.perf_counter() - start


def interleaved(variants: dict[str, Variant], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, warm-up calls excluded.  A variant is a callable, or a pair
    ``(setting, run)`` of which only ``run()`` is timed, inside the context manager ``setting()``."""
    for _ in range(warmup):
        for variant in variants.values():
            _timed(variant)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            samples[name].append(_timed(variants[name]))
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
