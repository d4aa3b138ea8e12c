"""Delta-tune a backbone on a classification task and save only the delta.

The defaults run offline on a CPU in a few minutes: LoRA on MiniLM-L6 for Rotten Tomatoes.  The run folder
(--out) receives training.json, delta/ (the best epoch's delta), metrics.json and metrics.png; an interrupted run
continues with --resume.  Under torchrun or accelerate launch, --strategy picks the engine (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from .. import sharding
from ..auto import DELTA_TYPES
from ..checkpoint import read_tensors
from ..distributed import STRATEGIES, World, accelerate_config, make_strategy
from ..training import loop, report
from ..training.data import subset
from ..training.loop import TrainingArguments, evaluate
from ..training.objectives import OBJECTIVES, make_objective
from .data_options import add_data_arguments, data_source, load_source
from .options import add_pooling_argument, check_counts, json_object, parse_overrides
from .training_info import TRAINING_FILE, recorded_lead


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainingArguments()
    parser.add_argument("--backbone", default="minilm-l6", help="asset name, local folder or hub id")
    add_data_arguments(parser, default_task="rotten_tomatoes")
    parser.add_argument("--delta", default="lora", help=f"delta type: {', '.join(sorted(DELTA_TYPES))}")
    parser.add_argument("--delta-config", nargs="*", default=[], metavar="JSON|KEY=VALUE",
                        help="delta options: a JSON object or file, or KEY=VALUE pairs (lora_r=16)")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="classify",
                        help="classify with a new head, or (decoders) write label words")
    add_pooling_argument(parser)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training data")
    parser.add_argument("--lr", type=float,
                        help="AdamW's peak learning rate (default: the method's, 1e-3; 3e-2 for soft_prompt)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio,
                        help="share of the steps with a linear warm-up, then linear decay")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping, in epochs")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="for the head, the delta and the order")
    parser.add_argument("--save-steps", type=int, default=defaults.save_steps, help="resume state interval")
    parser.add_argument("--max-train-examples", type=int, help="use only this many training examples")
    parser.add_argument("--max-eval-examples", type=int, help="and this many validation and test examples")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                        help="micro-batches per step and process (the step still takes --batch-size examples)")
    parser.add_argument("--out", type=Path, default=Path("out/train"), help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--strategy", choices=list(STRATEGIES), default=None,
                        help="the engine under torchrun / accelerate launch (default: the accelerate launch "
                             "config's, else single for one process and ddp for several)")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="bf16: mixed precision (autocast; FSDP2's and DeepSpeed's own bf16 modes); default: "
                             "the accelerate launch config's, else fp32")
    parser.add_argument("--deepspeed-config", type=Path, help="a DeepSpeed JSON config to add settings from")


def delta_options(items: list[str]) -> dict:
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        return json_object(items[0], "--delta-config")
    if len(items) == 1 and items[0].endswith(".json") and Path(items[0]).is_file():
        return json_object(Path(items[0]).read_text(), f"--delta-config file {items[0]}")
    return parse_overrides(items)


def run(args: argparse.Namespace) -> dict:
    if args.delta not in DELTA_TYPES:
        raise ValueError(f"unknown delta type {args.delta!r}; known: {', '.join(sorted(DELTA_TYPES))}")
    lr = DELTA_TYPES[args.delta].default_lr if args.lr is None else args.lr
    arguments = TrainingArguments(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                  warmup_ratio=args.warmup_ratio, patience=args.patience, seed=args.seed,
                                  save_steps=args.save_steps, grad_accum=args.grad_accum)
    world = World.from_environment()
    launcher = accelerate_config.requested()  # what an accelerate launch config asks for; the options win
    strategy = make_strategy(args.strategy or launcher.get("strategy") or ("ddp" if world.distributed else "single"),
                             world, args.precision or launcher.get("precision", "fp32"),
                             args.deepspeed_config or launcher.get("deepspeed_config"), arguments.grad_accum,
                             arguments.max_grad_norm)
    world.join()
    try:
        return _train(args, arguments, strategy)
    finally:
        strategy.close()  # the engine's objects go before the process group they use
        world.leave()


def _train(args: argparse.Namespace, arguments: TrainingArguments, strategy) -> dict:
    world = strategy.world
    check_counts(max_length=args.max_length, max_train_examples=args.max_train_examples,
                 max_eval_examples=args.max_eval_examples)
    record = {"backbone": args.backbone, "objective": args.objective, "data": data_source(args),
              "delta": args.delta, "delta_config": delta_options(args.delta_config), "max_length": args.max_length,
              "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
              "arguments": dataclasses.asdict(arguments), "strategy": strategy.name, "processes": world.size,
              "precision": strategy.precision}
    # Only the method's declared hyper-parameters, checked before anything loads (not attach=, name=, ...).
    DELTA_TYPES[args.delta].config_class.from_dict(record["delta_config"])
    _check_out_folder(args.out, record, args.resume)
    world.barrier()  # every rank has looked at --out before rank 0 writes into it
    task = subset(load_source(record["data"]), args.max_train_examples, args.max_eval_examples)
    torch.manual_seed(args.seed)  # the new head and the delta start the same way for a seed
    with strategy.loading():
        objective = make_objective(args.objective, args.backbone, task, args.max_length, args.pooling)
    strategy.place(objective.model)
    delta = DELTA_TYPES[args.delta](objective.model, **record["delta_config"])
    delta.freeze_module(exclude=["deltas", *objective.head])
    record.update(labels=task.labels, backbone_options=objective.backbone_options, head=objective.head)
    if hasattr(objective, "lead"):  # label words: the tokens before each text, which eval and --resume put back
        if args.resume:
            saved = json_object((args.out / TRAINING_FILE).read_text(errors="replace"), TRAINING_FILE)
            objective.lead = recorded_lead(saved, len(objective.tokenizer))
        record["lead_tokens"] = objective.lead
    trainable = delta.num_trainable_parameters()
    loop.prepare(objective, delta, task, arguments, strategy)
    _check_fits(objective, delta, task, args.max_length)
    if world.main:
        args.out.mkdir(parents=True, exist_ok=True)
        report.write_json(args.out / TRAINING_FILE, record)
        print(f"{task.name}: {task.sizes()}; {type(delta).__name__} on {len(delta.positions)} modules of "
              f"{sharding.unwrapped_class(objective.model).__name__}; {trainable:,} trainable parameters"
              + (f"; {strategy.name} on {world.size} processes" if world.distributed else ""))

    before = evaluate(objective, task.test, len(task.labels), world=world)
    history = loop.fit(objective, delta, task, arguments, args.out, resume=args.resume, strategy=strategy)
    delta.load_delta_state_dict(read_tensors(args.out / "delta"), args.out / "delta")  # the best epoch
    metrics = loop.summary(history, {
        "task": task.name, "backbone": args.backbone, "delta": args.delta, "objective": args.objective,
        "trainable_parameters": trainable, "delta_parameters": delta.num_delta_parameters(),
        "test": evaluate(objective, task.test, len(task.labels), world=world), "test_before_training": before,
        "test_majority_accuracy": max(sum(y == i for _, y in task.test) for i in range(len(task.labels)))
        / len(task.test),
        "checkpoint_bytes": sum(f.stat().st_size for f in (args.out / "delta").iterdir())})
    metrics["peak_memory_mb_per_rank"] = world.gather(metrics["peak_memory_mb"])
    sharding.settle(objective.model)
    metrics["parameter_mb_per_rank"] = world.gather(round(sharding.local_bytes(objective.model) / 2**20, 1))
    if world.main:
        report.write_json(args.out / "metrics.json", metrics)
        picture = report.plot(metrics, args.out / "metrics.png")
        loop.finished(args.out)  # complete: nothing to resume
        _print_results(metrics, task, args.out, picture)
    return metrics


def _print_results(metrics: dict, task, out: Path, picture: Path | None) -> None:
    test = metrics["test"]
    report.results_table(f"{task.name}: {metrics['delta']} on {metrics['backbone']} ({task.sizes()})", [
        ("majority class (test)", f"{metrics['test_majority_accuracy']:.1%}"),
        ("accuracy before training (test)", f"{metrics['test_before_training']['accuracy']:.1%}"),
        (f"accuracy after training (test, best epoch {metrics['best_epoch']})", f"{test['accuracy']:.1%}"),
        ("macro F1 (test)", f"{test['f1']:.3f}"),
        ("trainable parameters", f"{metrics['trainable_parameters']:,}"),
        ("training time", f"{metrics['train_seconds']:.0f} s"),
        ("delta checkpoint", f"{out / 'delta'} ({metrics['checkpoint_bytes'] / 1024:.0f} KiB)"),
        ("metrics", f"{out / 'metrics.json'}" + (f", {picture}" if picture else " (no plot: pip install matplotlib)")),
    ])


def _check_fits(objective, delta, task, max_length: int) -> None:
    """One forward pass on an input of ``max_length`` tokens before anything is written: settings the model cannot
    run (more positions than it embeds, with a prompt) fail here, not after training.json is in the run folder."""
    longest = " ".join(["a"] * max_length)
    try:
        with torch.no_grad():
            objective.loss([(longest, 0)])
    except (ValueError, RuntimeError, IndexError) as error:
        raise ValueError(f"{delta.delta_type} on {type(objective.model).__name__} cannot run inputs of "
                         f"--max-length {max_length} ({type(error).__name__}: {str(error).splitlines()[0]})") from None


def _check_out_folder(out: Path, record: dict, resume: bool) -> None:
    saved = out / TRAINING_FILE
    if resume:
        if not saved.exists():
            raise FileNotFoundError(f"nothing to resume in {out}: it has no {TRAINING_FILE}")
        previous = json_object(saved.read_text(errors="replace"), str(saved))
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed:
            raise ValueError(f"--resume continues the run in {out} with the same settings; these differ: {changed}")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out, or add --resume to continue that run")
