"""The training loop of ``deltatune train``: AdamW with linear warm-up and decay, gradient clipping, evaluation
on the validation split each epoch, best-epoch selection, early stopping, and exact resumption.

On several processes (:mod:`deltatune.distributed`) each step takes the same global batch as one process: rank
``r`` of ``N`` takes rows ``r, r+N, ...`` and splits them into ``grad_accum`` micro-batches, each loss weighted by
``N · (its share of the batch)`` so the averaged gradient is the single-process one.  Evaluation is split the
same way and the predictions gathered; rank 0 writes every file.

The run folder holds ``training.json`` (what was run), ``delta/`` (the best delta so far), ``metrics.json``,
``metrics.png`` and, while training, ``last.pt`` (delta tensors, optimizer, schedule, step and random state,
written atomically every ``save_steps`` steps and on Ctrl-C).  Data order depends only on the seed and the epoch,
so a resumed run takes the same steps as an uninterrupted one and ends with the same tensors.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base import DeltaBase
from ..checkpoint import remove_leftovers
from ..distributed import Strategy, World
from ..distributed.strategies import ENGINE_FOLDER
from .data import Rows, Task
from .metrics import scores
from .progress import StepProgress

STATE_FILE = "last.pt"


@dataclass
class TrainingArguments:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    patience: int = 2  # epochs without a better validation accuracy before stopping
    seed: int = 0
    save_steps: int = 50
    grad_accum: int = 1  # micro-batches per step (per process); the step's batch stays batch_size

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "save_steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be between 0 and 1, got {self.warmup_ratio}")


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_accuracy: float = -1.0
    seconds: float = 0.0  # training time, added up over resumptions
    step_losses: list[float] = field(default_factory=list)


def batches(rows: Rows, size: int) -> list[Rows]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@torch.no_grad()
def evaluate(objective, rows: Rows, num_labels: int, batch_size: int = 64, world: World = World()) -> dict[str, float]:
    objective.model.eval()
    share = -(-len(rows) // world.size)
    mine = rows[world.rank::world.size]
    padded = mine + rows[:1] * (share - len(mine))  # every rank runs as many batches (sharded engines need it)
    # Batches of texts of similar lengths pad less; the predictions are put back in the rows' order.
    by_length = sorted(range(len(padded)), key=lambda i: len(padded[i][0]))
    predicted = torch.empty(len(padded), dtype=torch.long)
    predicted[by_length] = torch.cat([objective.predict(chunk).cpu()
                                      for chunk in batches([padded[i] for i in by_length], batch_size)])
    predicted = predicted[:len(mine)]
    parts = world.gather(predicted.tolist())
    order = [parts[i % world.size][i // world.size] for i in range(len(rows))]  # row i came from rank i mod N
    return scores(torch.tensor(order), torch.tensor([label for _, label in rows]), num_labels)


def split(rows: Rows, parts: int) -> list[Rows]:
    """``rows`` in ``parts`` contiguous pieces of sizes as equal as possible (some empty if rows are few)."""
    size, extra = divmod(len(rows), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [rows[bounds[i]:bounds[i + 1]] for i in range(parts)]


def train_step(objective, strategy: Strategy, chunk: Rows, accumulation: int) -> float:
    """One optimizer step on the global batch ``chunk``; returns its mean loss (over all ranks)."""
    world = strategy.world
    total = objective.weight(chunk)
    pieces = split(chunk[world.rank::world.size], accumulation)
    weighted = 0.0
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        weight = objective.weight(piece)
        with strategy.syncing(last):
            with strategy.autocast():
                loss = objective.loss(piece or chunk[:1])  # a rank without rows still takes part, with weight 0
            strategy.backward(loss * (world.size * weight / total), last)
        weighted += loss.item() * weight
    strategy.step()
    return world.total(weighted) / total


def epoch_order(rows: Rows, seed: int, epoch: int) -> Rows:
    rows = list(rows)
    random.Random(seed * 1_000_003 + epoch).shuffle(rows)
    return rows


def linear_schedule(optimizer, total: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare(objective, delta: DeltaBase, task: Task, args: TrainingArguments, strategy: Strategy) -> None:
    """Hand the model and the delta's parameters to the strategy's engine (before any training forward)."""
    total = args.epochs * math.ceil(len(task.train) / args.batch_size)
    delta.backbone_fingerprint(keep=True)  # as loaded: before the engine shards or casts the backbone
    strategy.prepare(objective.model, delta.trainable_parameters, args.lr, args.weight_decay,
                     lambda optimizer: linear_schedule(optimizer, total, args.warmup_ratio), args.max_grad_norm,
                     args.grad_accum)
    objective.trained = strategy.model


def fit(objective, delta: DeltaBase, task: Task, args: TrainingArguments, out: Path, resume: bool = False,
        strategy: Strategy | None = None) -> History:
    """Train ``delta`` (and ``objective.head``) on ``task.train``; keep the best epoch's delta in ``out/delta``.
    ``strategy``: a prepared one (:func:`prepare`); by default one process."""
    if strategy is None:
        strategy = Strategy(World())
        prepare(objective, delta, task, args, strategy)
    model, world = objective.model, strategy.world
    steps_per_epoch = math.ceil(len(task.train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    history, step = History(), 0
    torch.manual_seed(args.seed)
    if resume:
        history, step = _restore(out, delta, strategy)
    earlier, started = history.seconds, time.time()
    progress = StepProgress(total, step, shown=world.main)

    rng = torch.get_rng_state()  # as at the start of the current step: an interrupted step is redone exactly

    def save_state() -> None:
        history.seconds = earlier + time.time() - started
        _save(out, delta, strategy, history, step, rng)

    try:
        with progress:
            while True:
                epoch, done = divmod(step, steps_per_epoch)  # epochs whose steps are all done; steps into the next
                if len(history.epochs) < epoch:  # also after resuming between an epoch's last step and its eval
                    losses = history.step_losses[(epoch - 1) * steps_per_epoch: epoch * steps_per_epoch]
                    _end_epoch(objective, delta, task, args, out, history, epoch - 1, losses, progress, world)
                    save_state()
                    continue
                if step >= total or _stopped_early(history, args.patience):
                    break
                model.train()
                for chunk in batches(epoch_order(task.train, args.seed, epoch), args.batch_size)[done:]:
                    rng = torch.get_rng_state()
                    loss = train_step(objective, strategy, chunk, args.grad_accum)
                    step += 1
                    history.step_losses.append(loss)
                    progress.advance(loss, len(chunk))
                    rng = torch.get_rng_state()
                    if step % args.save_steps == 0:
                        save_state()
    except KeyboardInterrupt:
        save_state()
        raise
    history.seconds = earlier + time.time() - started
    return history


def _end_epoch(objective, delta, task, args, out, history: History, epoch: int, losses: list[float],
               progress: StepProgress, world: World) -> None:
    validation = evaluate(objective, task.validation, len(task.labels), args.eval_batch_size, world)
    record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1),
              "eval_accuracy": validation["accuracy"], "eval_f1": validation["f1"]}
    history.epochs.append(record)
    if validation["accuracy"] > history.best_accuracy:
        history.best_accuracy, history.best_epoch = validation["accuracy"], epoch + 1
        delta.save_finetuned(out / "delta")  # every rank gathers, rank 0 writes
        world.barrier()  # the others read it back at the end
    progress.log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, validation accuracy "
                 f"{validation['accuracy']:.1%}, F1 {validation['f1']:.3f}"
                 + ("  (best so far, saved)" if history.best_epoch == epoch + 1 else ""))


def _stopped_early(history: History, patience: int) -> bool:
    return history.best_epoch is not None and len(history.epochs) - history.best_epoch >= patience


def _save(out: Path, delta: DeltaBase, strategy: Strategy, history: History, step: int, rng: torch.Tensor) -> None:
    path = out / STATE_FILE
    tensors = {k: t.clone() for k, t in delta.delta_state_dict().items()}
    state = {"step": step, "delta": tensors, "rng": rng, "history": asdict(history),
             **strategy.training_state(out, step)}  # every rank takes part; rank 0 writes the file
    if strategy.world.main:
        remove_leftovers(path)  # of a process killed while saving
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, staging)
        os.replace(staging, path)  # atomic: a crash leaves the previous state
    strategy.world.barrier()
    strategy.saved(out, state)


def _restore(out: Path, delta: DeltaBase, strategy: Strategy) -> tuple[History, int]:
    path = out / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (it is removed when a run completes)")
    state = torch.load(path, weights_only=True)
    delta.load_delta_state_dict(state["delta"], path)  # --resume already checked that the settings are the same
    strategy.load_training_state(out, state)
    torch.set_rng_state(state["rng"])
    return History(**state["history"]), state["step"]


def finished(out: Path) -> None:
    """A completed run keeps nothing to resume from."""
    (out / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / ENGINE_FOLDER, ignore_errors=True)


def summary(history: History, extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "epochs": history.epochs, "best_epoch": history.best_epoch, "step_losses": history.step_losses,
            "train_seconds": round(history.seconds, 2), "peak_memory_mb": round(peak_memory_mb(), 1)}
