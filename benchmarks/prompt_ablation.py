"""Prompt tuning on a small encoder: which choices matter, one change at a time against the chosen default.

Each row is one soft-prompt variant trained with the study's protocol (:mod:`deltatune.study.cell`) on each task;
full fine-tuning and the head alone are the references.  Cells are cached in --work, so an interrupted run continues.

    python -m benchmarks.prompt_ablation [--backbone minilm-l6] [--tasks rotten_tomatoes,sms_spam,trec]
        [--train-examples 4000|all] [--eval-examples 500|all] [--epochs 3] [--patience 3] [--only 1,3]
        [--name prompt_ablation] [--work out/prompt-ablation] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from deltatune.machine import machine
from deltatune.study import cell as cells
from deltatune.study import store
from deltatune.study.protocol import Budget, parse_method
from deltatune.study.runner import load_tasks

# (row, method, delta options, learning rate, pooling): the references, the default, then one change each.
VARIANTS = [
    ("full fine-tuning (reference)", "ft", {}, 5e-5, "auto"),
    ("head alone (reference)", "none", {}, 1e-2, "auto"),
    ("soft prompt: the default", "soft_prompt", {}, 3e-2, "auto"),
    ("the head reads the pooler ([CLS]) instead of the mean", "soft_prompt", {}, 3e-2, "model"),
    ("head alone on the pooler (reference)", "none", {}, 1e-2, "model"),
    ("random init (uniform ±0.5) instead of vocabulary embeddings", "soft_prompt", {"token_init": False}, 3e-2, "auto"),
    ("prompt before [CLS] (insert_at=0)", "soft_prompt", {"insert_at": 0}, 3e-2, "auto"),
    ("learning rate 1e-3 (a weight delta's)", "soft_prompt", {}, 1e-3, "auto"),
    ("learning rate 1e-1", "soft_prompt", {}, 1e-1, "auto"),
    ("reparameterised (residual MLP, 128 hidden)", "soft_prompt", {"reparameterize": True}, 3e-2, "auto"),
    ("100 prompt tokens", "soft_prompt", {"soft_token_num": 100}, 3e-2, "auto"),
    ("learning rate 1e-2", "soft_prompt", {}, 1e-2, "auto"),  # later rows go last: a row's number keys its cache
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--tasks", default="rotten_tomatoes,sms_spam,trec")
    parser.add_argument("--train-examples", type=_count, default=4000, help="a number, or all")
    parser.add_argument("--eval-examples", type=_count, default=500, help="validation and test each; or all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patience", type=int, default=3, help="validation points without a better one")
    parser.add_argument("--name", default="prompt_ablation", help="the result files' name in --out")
    parser.add_argument("--only", help="comma-separated row numbers to run (1 = the first row)")
    parser.add_argument("--work", type=Path, default=Path("out/prompt-ablation"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    budget = Budget("ablation", args.train_examples, args.eval_examples, args.epochs, 2, args.patience, (0,), (1.0,))
    tasks = load_tasks(args.tasks.split(","), budget)
    chosen = [int(i) - 1 for i in args.only.split(",")] if args.only else range(len(VARIANTS))
    rows = []
    for i in chosen:
        label, method, options, lr, pooling = VARIANTS[i]
        configs = {method: options} if method == "soft_prompt" else {}
        results = {}
        for name, task in tasks.items():
            cell = cells.Cell(name, parse_method(method), lr, 0)
            key = f"{args.backbone}/{args.train_examples or 'all'}x{args.epochs}/{i}/{cell.key}"
            record = store.load(args.work, "cells", key)
            if record is None or record["rates"] != cell.method.rates(lr):
                record = cells.run(cell, args.backbone, "classify", task, budget, configs, pooling=pooling)
                store.save(args.work, "cells", key, record)
            results[name] = record
            print(f"{label} / {name}: test {record['test_accuracy']:.1%} (validation "
                  f"{record['validation_accuracy']:.1%}, step {record['best_step']}), {record['cpu_seconds']:.0f} s",
                  flush=True)
        rows.append({"variant": label, "method": method, "options": options, "lr": lr, "pooling": pooling,
                     "results": results})
    write(args, rows)


def _count(text: str) -> int | None:
    return None if text == "all" else int(text)


def _shown(count: int | None) -> str:
    return "all" if count is None else f"{count:,}"


def write(args, rows) -> None:
    command = "python -m benchmarks.prompt_ablation " + " ".join(
        f"--{k.replace('_', '-')} {'all' if v is None else v}" for k, v in vars(args).items()
        if k not in ("work", "out", "only") or (k == "only" and v))
    info = machine(command, torch.get_num_threads())
    names = list(rows[0]["results"])
    lines = ["# Prompt tuning on a small encoder: an ablation", "",
             f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads), torch "
             f"{info['versions']['torch']}, transformers {info['versions']['transformers']}; `{command}`; "
             f"the cells took {sum(r['cpu_seconds'] for row in rows for r in row['results'].values()) / 60:.0f} "
             "CPU minutes.", "",
             f"{args.backbone}; {_shown(args.train_examples)} training examples, {args.epochs} epochs, "
             f"{_shown(args.eval_examples)} validation and test examples per task; batch 32, 64 tokens; test accuracy "
             f"(%) at the best of 2 validation points per epoch, stopping after {args.patience} points without a "
             "better one (in brackets: validation accuracy, and the best point's step of the steps run); one seed.",
             "",
             "| variant | lr | pooling | " + " | ".join(names) + " | average test |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        results = [row["results"][n] for n in names]
        cells = [f"{100 * r['test_accuracy']:.1f} ({100 * r['validation_accuracy']:.1f}; {r['best_step']}/{r['steps']})"
                 for r in results]
        average = sum(r["test_accuracy"] for r in results) / len(results)
        lines.append(f"| {row['variant']} | {row['lr']:g} | {row['pooling']} | " + " | ".join(cells)
                     + f" | {100 * average:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    kept = [{**row, "results": {n: {k: v for k, v in r.items() if k != "losses"} for n, r in row["results"].items()}}
            for row in rows]  # the step losses would make the file long; the cells in --work keep them
    (args.out / f"{args.name}.json").write_text(json.dumps({"machine": info, "rows": kept}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
