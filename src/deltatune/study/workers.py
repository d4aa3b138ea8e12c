"""Training a study's unfinished cells: one after another, or ``jobs`` at a time in worker processes.

Workers share the cores (``torch.get_num_threads() // jobs`` threads each), as a small backbone's training step
uses two threads poorly: on 2 cores two MiniLM-L6 cells of the ``full`` budget side by side, one thread each, train
1.11× (adapter, BitFit) to 1.22× (fine-tuning) as many steps per second as one cell on both (docs/study.md).
A cell's thread count is in its record: it changes floating-point sums, so a cell trained on one thread is a run
of its own, not a copy of the same cell on two.  A worker returns its cell's record and the parent writes it, so the
study folder has one writer.  A cell that fails
stops the study once the cells running beside it have finished and been kept.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

import torch

from ..training.data import Task
from ..training.progress import output_console
from . import cell as cells

Numbered = tuple[int, cells.Cell]  # a cell and its number in the study's list


def train(pending: list[Numbered], total: int, study, tasks: dict[str, Task], jobs: int,
          keep: Callable[[int, cells.Cell, dict[str, Any]], None]) -> None:
    """Train every cell of ``pending``, calling ``keep(number, cell, record)`` in this process as each finishes."""
    jobs = min(jobs, len(pending))
    if jobs <= 1:
        for number, cell in pending:
            keep(number, cell, _train(number, total, cell, study, tasks[cell.task], False))
        return
    threads = max(1, torch.get_num_threads() // jobs)
    # spawn, not fork: a forked copy of a process whose OpenMP threads have started can hang
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        running = {pool.submit(_train, number, total, cell, study, tasks[cell.task], True): (number, cell)
                   for number, cell in pending}
        for number, cell, record in _finished(running):
            keep(number, cell, record)


def _finished(running: dict[Future, Numbered]) -> Iterator[tuple[int, cells.Cell, dict[str, Any]]]:
    failure = None
    for future in as_completed(running):
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or (error and failure):
            continue
        if error is None:
            yield *running[future], future.result()
            continue
        failure = error
        output_console().print(f"{running[future][1].key} failed; stopping once the cells running beside it are "
                               "kept", markup=False)
        for other in running:
            other.cancel()
    if failure is not None:
        raise failure


def _train(number: int, total: int, cell: cells.Cell, study, task: Task, named: bool) -> dict[str, Any]:
    """One cell's record; ``named``: progress lines name the cell, as other cells' lines come between them."""
    console = output_console()
    console.print(f"[{number}/{total}] {cell.key}: training", markup=False)
    who = f"{cell.key} " if named else ""

    def show(step: int, accuracy: float) -> None:
        console.print(f"    {who}step {step}: validation {accuracy:.1%}", markup=False)

    return cells.run(cell, study.backbone, study.objective, task, study.budget, study.delta_configs, on_point=show,
                     pooling=study.pooling)
