"""What a run leaves: ``metrics.json``, ``metrics.png`` (needs matplotlib, the ``plot`` extra) and a results table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from .progress import output_console


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a crash leaves the previous file, never half of one."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None without matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(metrics: dict[str, Any], path: Path) -> Path | None:
    """Training loss per step and validation accuracy / F1 per epoch, side by side."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    losses = metrics["step_losses"]
    left.plot(range(1, len(losses) + 1), losses, linewidth=0.8, color="tab:blue")
    left.set(title="training loss", xlabel="step", ylabel="loss")
    epochs = [e["epoch"] for e in metrics["epochs"]]
    right.plot(epochs, [e["eval_accuracy"] for e in metrics["epochs"]], "o-", label="accuracy")
    right.plot(epochs, [e["eval_f1"] for e in metrics["epochs"]], "s--", label="macro F1")
    right.set(title="validation", xlabel="epoch", ylim=(0, 1), xticks=epochs)
    right.legend(loc="lower right")
    figure.suptitle(f"{metrics['delta']} on {metrics['backbone']}, {metrics['task']}")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def results_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    console = output_console()
    console.print(title, markup=False)
    console.print(table)
