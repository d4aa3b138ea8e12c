"""The training loop of ``deltatune train``: AdamW with linear warm-up and decay, gradient clipping, evaluation
on the validation split each epoch, best-epoch selection, early stopping, and exact resumption.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base import DeltaBase
from ..checkpoint import remove_leftovers
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

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "save_steps"):
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
def evaluate(objective, rows: Rows, num_labels: int, batch_size: int = 64) -> dict[str, float]:
    objective.model.eval()
    predicted = torch.cat([objective.predict(chunk) for chunk in batches(rows, batch_size)])
    return scores(predicted, torch.tensor([label for _, label in rows]), num_labels)


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


def fit(objective, delta: DeltaBase, task: Task, args: TrainingArguments, out: Path,
        resume: bool = False) -> History:
    """Train ``delta`` (and ``objective.head``) on ``task.train``; keep the best epoch's delta in ``out/delta``."""
    model, parameters = objective.model, delta.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(task.train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    schedule = linear_schedule(optimizer, total, args.warmup_ratio)
    history, step = History(), 0
    torch.manual_seed(args.seed)
    if resume:
        history, step = _restore(out / STATE_FILE, delta, optimizer, schedule)
    earlier, started = history.seconds, time.time()
    progress = StepProgress(total, step)

    rng = torch.get_rng_state()  # as at the start of the current step: an interrupted step is redone exactly

    def save_state() -> None:
        history.seconds = earlier + time.time() - started
        _save(out / STATE_FILE, delta, optimizer, schedule, history, step, rng)

    try:
        with progress:
            while True:
                epoch, done = divmod(step, steps_per_epoch)  # epochs whose steps are all done; steps into the next
                if len(history.epochs) < epoch:  # also after resuming between an epoch's last step and its eval
                    losses = history.step_losses[(epoch - 1) * steps_per_epoch: epoch * steps_per_epoch]
                    _end_epoch(objective, delta, task, args, out, history, epoch - 1, losses, progress)
                    save_state()
                    continue
                if step >= total or _stopped_early(history, args.patience):
                    break
                model.train()
                for chunk in batches(epoch_order(task.train, args.seed, epoch), args.batch_size)[done:]:
                    rng = torch.get_rng_state()
                    loss = objective.loss(chunk)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    history.step_losses.append(loss.item())
                    progress.advance(loss.item(), len(chunk))
                    rng = torch.get_rng_state()
                    if step % args.save_steps == 0:
                        save_state()
    except KeyboardInterrupt:
        save_state()
        raise
    history.seconds = earlier + time.time() - started
    return history


def _end_epoch(objective, delta, task, args, out, history: History, epoch: int, losses: list[float],
               progress: StepProgress) -> None:
    validation = evaluate(objective, task.validation, len(task.labels), args.eval_batch_size)
    record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1),
              "eval_accuracy": validation["accuracy"], "eval_f1": validation["f1"]}
    history.epochs.append(record)
    if validation["accuracy"] > history.best_accuracy:
        history.best_accuracy, history.best_epoch = validation["accuracy"], epoch + 1
        delta.save_finetuned(out / "delta")
    progress.log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, validation accuracy "
                 f"{validation['accuracy']:.1%}, F1 {validation['f1']:.3f}"
                 + ("  (best so far, saved)" if history.best_epoch == epoch + 1 else ""))


def _stopped_early(history: History, patience: int) -> bool:
    return history.best_epoch is not None and len(history.epochs) - history.best_epoch >= patience


def _save(path: Path, delta: DeltaBase, optimizer, schedule, history: History, step: int,
          rng: torch.Tensor) -> None:
    state = {"step": step, "delta": {k: t.detach().clone() for k, t in delta.delta_state_dict().items()},
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "rng": rng, "history": asdict(history)}
    remove_leftovers(path)  # of a process killed while saving
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, staging)
    os.replace(staging, path)  # atomic: a crash leaves the previous state


def _restore(path: Path, delta: DeltaBase, optimizer, schedule) -> tuple[History, int]:
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (it is removed when a run completes)")
    state = torch.load(path, weights_only=True)
    delta.load_delta_state_dict(state["delta"], path)  # --resume already checked that the settings are the same
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return History(**state["history"]), state["step"]


def summary(history: History, extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "epochs": history.epochs, "best_epoch": history.best_epoch, "step_losses": history.step_losses,
            "train_seconds": round(history.seconds, 2), "peak_memory_mb": round(peak_memory_mb(), 1)}
