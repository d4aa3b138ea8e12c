"""The data options shared by ``train`` and ``eval``: a built-in task, the user's files, or a hub dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..training.data import Task
from ..training.hub_data import hub_task
from ..training.tasks import TASKS, load_task
from ..training.user_data import file_task


def add_data_arguments(parser: argparse.ArgumentParser, default_task: str | None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--task", default=default_task, help=f"built-in task: {', '.join(TASKS)}"
                       + (f" (default {default_task})" if default_task else ""))
    group.add_argument("--data", type=Path, metavar="FILE", help="your training data: .csv, .tsv or .jsonl")
    group.add_argument("--validation-data", type=Path, metavar="FILE", help="default: 10%% of --data")
    group.add_argument("--test-data", type=Path, metavar="FILE", help="default: another 10%% of --data")
    group.add_argument("--dataset", metavar="NAME[:CONFIG]", help="a Hugging Face datasets dataset (online)")
    group.add_argument("--text-column", default="text", help="the column of --data holding the text")
    group.add_argument("--label-column", default="label", help="the column of --data holding the label")


def data_source(args: argparse.Namespace) -> dict[str, Any]:
    """What the data options name, as recorded in training.json (paths made absolute)."""
    if args.data is not None:
        return {"data": str(args.data.resolve()),
                "validation_data": str(args.validation_data.resolve()) if args.validation_data else None,
                "test_data": str(args.test_data.resolve()) if args.test_data else None,
                "text_column": args.text_column, "label_column": args.label_column}
    if args.dataset is not None:
        return {"dataset": args.dataset, "text_column": args.text_column, "label_column": args.label_column}
    if args.task is None:
        raise ValueError("name the data: --task, --data or --dataset")
    return {"task": args.task}


def load_source(source: dict[str, Any]) -> Task:
    if "data" in source:
        optional = lambda key: Path(source[key]) if source.get(key) else None  # noqa: E731
        return file_task(Path(source["data"]), optional("validation_data"), optional("test_data"),
                         source["text_column"], source["label_column"])
    if "dataset" in source:
        return hub_task(source["dataset"], source["text_column"], source["label_column"])
    return load_task(source["task"])
