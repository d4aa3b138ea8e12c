"""Run a study: every task × method × learning rate × seed cell (cached), the memory points, then the report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training.data import Task, subset
from ..training.objectives import chosen_pooling, lead_tokens
from ..training.progress import output_console
from ..training.tasks import load_task
from . import cell as cells
from . import memory, store, workers
from .protocol import FULL_FINE_TUNING, Budget, Method, combinations, parse_method
from .report import write_report
from .results import summarize

MEMORY_BATCHES = (1, 8, 32)


@dataclass
class Study:
    backbone: str
    tasks: list[str]
    methods: list[Method]
    budget: Budget
    out: Path
    objective: str = "classify"
    pooling: str = "auto"  # a classifier's (deltatune.pooling)
    combinations: bool = False  # also the 8 subsets of soft prompt, BitFit and adapter, on every task
    memory_batches: tuple[int, ...] = MEMORY_BATCHES  # peak memory against these batch sizes; () skips it
    delta_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    command: str = ""  # how the study was run, for the report
    lead_tokens: tuple[int, ...] = ()  # what label words put before each text (set by run_study)
    jobs: int = 1  # cells trained at once, each in its own process (deltatune.study.workers)

    def protocol(self) -> dict[str, Any]:
        """What every cell shares (the seeds and the rates only choose which cells run)."""
        budget = {k: v for k, v in dataclasses.asdict(self.budget).items()
                  if k not in ("name", "seeds", "rate_factors", "method_rate_factors")}
        protocol = {"backbone": self.backbone, "objective": self.objective, "pooling": self.pooling,
                    "budget": budget, "delta_configs": self.delta_configs}
        if self.lead_tokens:  # recorded only when there are some: studies from before them still match
            protocol["lead_tokens"] = list(self.lead_tokens)
        return protocol

    def all_methods(self) -> list[Method]:
        extra = combinations() if self.combinations else []
        return list({m.name: m for m in [*self.methods, *extra]}.values())

    def cells(self) -> list[cells.Cell]:
        return [cells.Cell(task, method, lr, seed) for task in self.tasks for method in self.all_methods()
                for lr in self.budget.rates(method) for seed in self.budget.seeds]


def load_tasks(names: list[str], budget: Budget) -> dict[str, Task]:
    return {name: subset(load_task(name), budget.train_examples, budget.eval_examples) for name in names}


def run_study(study: Study) -> dict[str, Any]:
    """Run (or continue) ``study`` in ``study.out``; returns the results written to ``results.json``."""
    for method in study.methods:
        parse_method(method.name)  # a Method made by hand is checked like a parsed one
    tasks = load_tasks(study.tasks, study.budget)
    lead = tuple(lead_tokens(study.backbone)) if study.objective == "label-words" else ()
    study = dataclasses.replace(study, pooling=chosen_pooling(study.objective, study.pooling, study.backbone),
                                lead_tokens=lead)
    store.check_protocol(study.out, study.protocol())
    console = output_console()
    todo = study.cells()
    records: list[dict[str, Any] | None] = [None] * len(todo)
    pending, started = [], time.time()

    def done(number: int, record: dict[str, Any], how: str) -> None:
        records[number - 1] = record
        console.print(f"[{number}/{len(todo)}] {record['key']}: validation {record['validation_accuracy']:.1%} (step "
                      f"{record['best_step']}), test {record['test_accuracy']:.1%}; {how}", markup=False)

    def keep(number: int, cell: cells.Cell, record: dict[str, Any]) -> None:
        _keep(study, "cells", cell.key, record)
        done(number, record, f"{record['cpu_seconds']:.0f} s of CPU")

    for number, cell in enumerate(todo, 1):
        record = store.load(study.out, "cells", cell.key)
        if record is not None and record["rates"] != cell.method.rates(cell.lr):
            console.print(f"[{number}/{len(todo)}] {cell.key}: its cached rates {record['rates']} are not this "
                          f"version's {cell.method.rates(cell.lr)}; training it again", markup=False)
            record = None
        if record is None:
            pending.append((number, cell))
        else:
            done(number, record, "cached")
    workers.train(pending, len(todo), study, tasks, study.jobs, keep)
    points = _memory_points(study, console) if study.memory_batches else []
    results = summarize(study, records, points, tasks, time.time() - started)
    write_report(study.out, results)
    console.print(f"report: {study.out / 'report.md'}, {study.out / 'report.html'}", markup=False)
    return results


def _keep(study: Study, kind: str, key: str, record: dict[str, Any]) -> None:
    store.record_protocol(study.out, study.protocol())  # with the first result: a study that fails first leaves none
    store.save(study.out, kind, key, record)


def _memory_points(study: Study, console) -> list[dict[str, Any]]:
    if not memory.supported():
        console.print("memory: skipped (needs Linux's /proc/self/clear_refs)", markup=False)
        return []
    names = list(dict.fromkeys([FULL_FINE_TUNING, *(m.name for m in study.methods)]))  # ft: the reference
    points = []
    for name in names:
        for batch in study.memory_batches:
            key = f"{name}/batch={batch}"
            point = store.load(study.out, "memory", key)
            if point is None:
                point = {"method": name, "batch": batch,
                         **memory.measure(study.backbone, study.objective, study.tasks[0], name, batch, study.budget,
                                          study.delta_configs, study.pooling)}
                _keep(study, "memory", key, point)
            points.append(point)
            console.print(f"memory {key}: peak {point['peak_mb']:,.0f} MB", markup=False)
    return points
