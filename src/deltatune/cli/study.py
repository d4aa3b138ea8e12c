"""Compare fine-tuning and delta-tuning methods on tasks, as the Delta Tuning survey does, and write a report.

Every task × method × learning rate × seed cell trains from a freshly loaded backbone; finished cells are kept in
--out, so a killed study continues with the same command, and adding tasks or methods reuses what is there.  The
folder receives results.json, report.md, report.html and PNG figures (docs/study.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from fractions import Fraction
from pathlib import Path

from ..auto import DELTA_TYPES
from ..study.protocol import BUDGETS, GRID_FACTORS, Method, combinations, parse_method
from ..study.runner import MEMORY_BATCHES, Study, run_study
from ..training.objectives import OBJECTIVES
from ..training.tasks import TASKS
from .options import add_pooling_argument, check_counts, json_object

DEFAULT_METHODS = "ft,lora,adapter,bitfit,prefix,soft_prompt"
DEFAULT_TASKS = "rotten_tomatoes,sms_spam,trec"
RATE_NAMES = {"default": (1.0,), "grid": GRID_FACTORS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="minilm-l6", help="asset name, local folder or hub id")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated built-in tasks: {', '.join(TASKS)}")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated: ft (full fine-tuning), none (the head alone), delta types, or delta "
                             "types joined by +")
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick",
                        help="quick: 1,000 examples, 3 epochs, default rates, 1 seed; full: all data, rate grid, "
                             "3 seeds")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="classify",
                        help="classify with a new head, or (decoders) write label words")
    add_pooling_argument(parser)
    parser.add_argument("--combinations", action="store_true",
                        help="also every subset of soft_prompt, bitfit and adapter, on every task")
    parser.add_argument("--memory-batches", default=",".join(map(str, MEMORY_BATCHES)),
                        help="batch sizes at which to measure the peak memory of a training step; 'none' skips it")
    parser.add_argument("--delta-config", default="{}", metavar="JSON",
                        help='options per delta type, e.g. \'{"soft_prompt": {"soft_token_num": 20}}\'')
    parser.add_argument("--rates", action="append", default=[], metavar="[METHOD=]default|grid|FACTORS",
                        help="each method's default learning rate, the grid around it (x1/3, x1, x3), or "
                             "comma-separated factors on the default such as 1/9,1/3,1,3 (overrides the budget's); "
                             "repeat as METHOD=... to give one method its own, e.g. --rates prefix=1/9,1/3,1,3")
    parser.add_argument("--seeds", help="comma-separated seeds (overrides the budget's)")
    parser.add_argument("--epochs", type=int, help="overrides the budget's")
    parser.add_argument("--max-train-examples", metavar="N|all", help="overrides the budget's")
    parser.add_argument("--max-eval-examples", metavar="N|all",
                        help="validation and test each; overrides the budget's")
    parser.add_argument("--batch-size", type=int, help="overrides the budget's (32)")
    parser.add_argument("--max-length", type=int, help="tokens per example; overrides the budget's (64)")
    parser.add_argument("--out", type=Path, help="the study folder (default: out/study-BACKBONE-BUDGET)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once, each in its own process with its share of the cores (on 2 "
                             "cores, 2 jobs train MiniLM-L6 1.11-1.22x as fast)")


def _names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{option} names nothing")
    _refuse_repeats(names, option)
    return names


def _integers(text: str, option: str, least: int) -> tuple[int, ...]:
    try:
        values = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    _refuse_repeats(values, option)
    if min(values) < least:
        raise ValueError(f"{option} must be at least {least} each, got {text}")
    return values


def _rates(texts: list[str], methods: list[Method]) -> tuple[tuple[float, ...] | None, tuple | None]:
    """``--rates`` given any number of times: the factors for every method (None: the budget's) and, from
    ``METHOD=FACTORS``, one method's own (None: none)."""
    shared = [t for t in texts if "=" not in t]
    own = [t.split("=", 1) for t in texts if "=" in t]
    if len(shared) > 1:
        raise ValueError(f"--rates without a method is given twice: {', '.join(shared)}")
    _refuse_repeats([name for name, _ in own], "--rates METHOD=...")
    names = list(dict.fromkeys(m.name for m in methods))
    for name, _ in own:
        if name not in names:
            raise ValueError(f"--rates {name}=...: {name!r} is not among the study's methods ({', '.join(names)})")
    return (_rate_factors(shared[0]) if shared else None,
            tuple((name, _rate_factors(text)) for name, text in own) or None)


def _rate_factors(text: str) -> tuple[float, ...]:
    """``default`` and ``grid`` by name, or factors such as ``1/9,1/3,1,3``, increasing."""
    if text in RATE_NAMES:
        return RATE_NAMES[text]
    try:
        factors = [Fraction(f.strip()) for f in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--rates takes default, grid, or comma-separated factors on each method's default rate "
                         f"such as 1/9,1/3,1,3; got {text!r}") from None
    _refuse_repeats(factors, "--rates")
    if min(factors) <= 0:
        raise ValueError(f"--rates factors must be positive, got {text}")
    return tuple(float(f) for f in sorted(factors))  # increasing: a tie goes to the lower rate


def _refuse_repeats(values, option: str) -> None:
    """A repeated name or number is more likely a typo (``--seeds 0,0`` for ``0,1``) than a wish to run it once."""
    repeated = list(dict.fromkeys(str(v) for v in values if values.count(v) > 1))
    if repeated:
        raise ValueError(f"{option} repeats {', '.join(repeated)}")


def _examples(text: str | None, field: str, option: str) -> dict[str, int | None]:
    """A budget override of ``field``: none when the option is not given, None (every example) for ``all``."""
    if text is None:
        return {}
    if text == "all":
        return {field: None}
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{option} takes a number or 'all', got {text!r}") from None
    check_counts(**{option[2:].replace("-", "_"): count})
    return {field: count}


def make_study(args: argparse.Namespace) -> Study:
    check_counts(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, jobs=args.jobs)
    tasks = _names(args.tasks, "--tasks")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; built-in tasks: {', '.join(TASKS)}")
    methods = [parse_method(name) for name in _names(args.methods, "--methods")]
    seeds = None if args.seeds is None else _integers(args.seeds, "--seeds", 0)
    batches = () if args.memory_batches == "none" else _integers(args.memory_batches, "--memory-batches", 1)
    shared_factors, own_factors = _rates(args.rates, methods + (combinations() if args.combinations else []))
    budget = dataclasses.replace(
        BUDGETS[args.budget].with_overrides(seeds=seeds, epochs=args.epochs, batch_size=args.batch_size,
                                            max_length=args.max_length,
                                            rate_factors=shared_factors, method_rate_factors=own_factors),
        **_examples(args.max_train_examples, "train_examples", "--max-train-examples"),
        **_examples(args.max_eval_examples, "eval_examples", "--max-eval-examples"))
    configs = json_object(args.delta_config, "--delta-config")
    for part, options in configs.items():
        _check_options(part, options)
    name = Path(args.backbone).name or args.backbone
    return Study(args.backbone, tasks, methods, budget, args.out or Path(f"out/study-{name}-{args.budget}"),
                 args.objective, args.pooling, args.combinations, batches, configs,
                 shlex.join(["deltatune", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else "", jobs=args.jobs)


def _check_options(part: str, options) -> None:
    """Unknown or out-of-range options fail before any cell runs."""
    if part not in DELTA_TYPES or not isinstance(options, dict):
        raise ValueError(f"--delta-config maps delta types ({', '.join(sorted(DELTA_TYPES))}) to objects of "
                         f"options; got {part!r}: {options!r}")
    DELTA_TYPES[part].config_class.from_dict(options)


def run(args: argparse.Namespace) -> dict:
    return run_study(make_study(args))
