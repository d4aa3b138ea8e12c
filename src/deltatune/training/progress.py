"""A progress bar with the running loss and throughput on a terminal; a line per epoch (and none per step)
elsewhere, so logs stay short."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def output_console() -> Console:
    """The terminal's width on a terminal; 120 columns in a log file, where rich would otherwise wrap at 80."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=120)


class StepProgress:
    def __init__(self, total: int, done: int = 0, shown: bool = True) -> None:
        self.console, self.shown = output_console(), shown  # shown: by one process of several
        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} examples/s"),
                            TimeRemainingColumn(), console=self.console,
                            disable=not (shown and self.console.is_terminal))
        self.task = self.bar.add_task("train", total=total, completed=done, loss=float("nan"), rate=0.0)
        self.examples, self.started = 0, time.time()

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, loss: float, examples: int) -> None:
        self.examples += examples
        rate = self.examples / max(time.time() - self.started, 1e-9)
        self.bar.update(self.task, advance=1, loss=loss, rate=rate)

    def log(self, line: str) -> None:
        if not self.shown:
            return
        rate = self.examples / max(time.time() - self.started, 1e-9)
        self.console.print(f"{line}  [{rate:.1f} examples/s]", markup=False)
