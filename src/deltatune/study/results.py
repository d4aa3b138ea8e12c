"""From cell records to the study's results: model selection over the rate grid, mean ± std over seeds.

For each task, method and seed the rate with the best validation accuracy is chosen (the earliest in the grid on
a tie) and its test accuracy counts; the table reports the mean and the standard deviation over the seeds.  When
every seed chose the same end of a grid of three or more rates, strictly better than the others, the entry's
``edge`` names that end: the best rate may lie beyond the grid.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any

import torch

from ..machine import machine
from .protocol import COMBINED, FULL_FINE_TUNING, combinations

NEAR_BEST = 0.01  # one point of accuracy
UNRECORDED = "unrecorded machines"  # cells trained before records named their machine


def _chosen(records: list[dict[str, Any]], seeds) -> list[dict[str, Any]]:
    """The selected record per seed (records in grid order)."""
    return [max((r for r in records if r["seed"] == seed), key=lambda r: r["validation_accuracy"]) for seed in seeds
            if any(r["seed"] == seed for r in records)]


def _near_best_step(record: dict[str, Any]) -> int:
    """The first validation step within ``NEAR_BEST`` of the cell's best validation accuracy: how fast it
    converged."""
    best = record["validation_accuracy"]
    return next(step for step, accuracy in record["curve"] if accuracy >= best - NEAR_BEST)


def _edge(records: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> str | None:
    """``"lowest"`` or ``"highest"`` if every seed chose that end of the grid and no other rate tied with it."""
    grid = sorted({r["lr"] for r in records})
    if len(grid) < 3:  # with two rates every choice is an end
        return None

    def alone(pick: dict[str, Any]) -> bool:  # a tie goes to the lowest rate, which says nothing about beyond it
        return sum(r["seed"] == pick["seed"] and r["validation_accuracy"] >= pick["validation_accuracy"]
                   for r in records) == 1

    for end, lr in (("lowest", grid[0]), ("highest", grid[-1])):
        if all(pick["lr"] == lr and alone(pick) for pick in chosen):
            return end
    return None


def _entry(records: list[dict[str, Any]], seeds) -> dict[str, Any]:
    chosen = _chosen(records, seeds)
    tests = [r["test_accuracy"] for r in chosen]
    return {"test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "validation_mean": statistics.fmean(r["validation_accuracy"] for r in chosen),
            "test_f1_mean": statistics.fmean(r["test_f1"] for r in chosen), "seeds": len(chosen),
            "lrs": [r["lr"] for r in chosen], "edge": _edge(records, chosen), "rates": chosen[0]["rates"],
            "trainable_parameters": chosen[0]["trainable_parameters"],
            "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in chosen),
            "grid_cpu_seconds": sum(r["cpu_seconds"] for r in records),
            "steps": statistics.fmean(r["steps"] for r in chosen),
            "best_step": statistics.fmean(r["best_step"] for r in chosen),
            "near_best_step": statistics.fmean(_near_best_step(r) for r in chosen),
            "curve": chosen[0]["curve"], "steps_per_epoch": chosen[0]["steps_per_epoch"]}


def summarize(study, records: list[dict[str, Any]], memory: list[dict[str, Any]], tasks, seconds: float) -> dict:
    seeds = study.budget.seeds
    names = [m.name for m in study.all_methods()]
    table = {task: {name: _entry([r for r in records if r["task"] == task and r["method"] == name], seeds)
                    for name in names}
             for task in study.tasks}
    singles = [m.name for m in study.methods]
    results = {
        "backbone": study.backbone, "objective": study.objective, "budget": study.budget.name,
        "protocol": study.protocol(), "seeds": list(seeds),
        "rate_factors": {m.name: list(study.budget.factors(m)) for m in study.all_methods()},
        "tasks": {name: {"sizes": task.sizes(), "labels": len(task.labels), "majority": _majority(task.test)}
                  for name, task in tasks.items()},
        "methods": singles, "table": table,
        "average": {name: statistics.fmean(table[t][name]["test_mean"] for t in study.tasks) for name in names},
        "memory": memory,
        "combinations": [m.name for m in combinations()] if study.combinations else [],
        "combined_parts": list(COMBINED), "reference": FULL_FINE_TUNING if FULL_FINE_TUNING in singles else None,
        "cells": len(records), "cpu_seconds": round(sum(r["cpu_seconds"] for r in records), 1),
        "cell_machines": collections.Counter(r.get("machine", UNRECORDED) for r in records).most_common(),
        "seconds_this_run": round(seconds, 1), "machine": machine(study.command, torch.get_num_threads()),
    }
    return results


def _majority(rows) -> float:
    labels = [label for _, label in rows]
    return max(labels.count(label) for label in set(labels)) / len(labels)
