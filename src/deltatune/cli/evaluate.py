"""Reload a trained delta onto a fresh backbone and report its accuracy and macro F1.

DIR is a run folder of ``deltatune train``; the backbone, objective, labels and data are those of the run unless
--task / --data / --dataset name others (with the same labels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..base import DeltaBase
from ..training import report
from ..training.data import subset
from ..training.loop import evaluate
from ..training.objectives import make_objective
from .data_options import add_data_arguments, data_source, load_source
from .options import check_counts
from .training_info import delta_and_options, read_run, recorded_lead


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delta", type=Path, required=True, metavar="DIR", help="a run folder of deltatune train")
    add_data_arguments(parser, default_task=None)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--max-eval-examples", type=int)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the metrics as JSON")


def run(args: argparse.Namespace) -> dict:
    check_counts(max_eval_examples=args.max_eval_examples)
    record, delta_folder = read_run(args.delta)
    named = args.task is not None or args.data is not None or args.dataset is not None
    task = load_source(data_source(args) if named else record["data"])
    if task.labels != record["labels"]:
        raise ValueError(f"the delta was trained for labels {record['labels'][:10]}, this data has "
                         f"{task.labels[:10]}")
    task = subset(task, None, args.max_eval_examples)
    pooling = delta_and_options(args.delta)[1].get("pooling", "model")  # checked; a run folder from before: model
    objective = make_objective(record["objective"], record["backbone"], task, record["max_length"], pooling)
    if hasattr(objective, "lead"):  # label words: the tokens trained before each text (none before they were recorded)
        objective.lead = recorded_lead(record, len(objective.tokenizer))
    delta = DeltaBase.from_finetuned(delta_folder, objective.model)
    rows = task.split(args.split)
    metrics = {"task": task.name, "split": args.split, "examples": len(rows), "delta": delta.delta_type,
               "backbone": record["backbone"], **evaluate(objective, rows, len(task.labels))}
    report.results_table(f"{task.name} ({args.split}, {len(rows):,} examples): {delta.delta_type} from "
                         f"{delta_folder}", [("accuracy", f"{metrics['accuracy']:.1%}"),
                                             ("macro F1", f"{metrics['f1']:.3f}")])
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
