"""One cell of a study: one task, one method, one learning rate, one seed — trained from a freshly loaded backbone.

AdamW with linear warm-up (10% of the steps) and decay, gradient clipping at 1.0.  The validation accuracy is
measured ``evaluations_per_epoch`` times per epoch (the convergence curve); the trainable tensors of the best
point are kept, training stops after ``patience`` points without a better one, and the test split is evaluated
once, with the best point's tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..auto import DELTA_TYPES
from ..machine import cpu_and_versions
from ..training.data import Task
from ..training.loop import batches, epoch_order, evaluate, linear_schedule
from ..training.objectives import make_objective
from .protocol import FULL_FINE_TUNING, HEAD, Budget, Method


@dataclass(frozen=True)
class Cell:
    task: str
    method: Method
    lr: float
    seed: int

    @property
    def key(self) -> str:
        rate = f"lr-factor={self.lr:.3g}" if self.method.combined else f"lr={self.lr:g}"
        return f"{self.task}/{self.method.name}/{rate}/seed={self.seed}"


def build(cell: Cell, backbone: str, objective_name: str, task: Task, budget: Budget, delta_configs: dict,
          pooling: str = "auto"):
    """The objective (its freshly loaded model) and the optimizer's parameter groups for ``cell``."""
    torch.manual_seed(cell.seed)  # the head and the deltas start the same way for a seed
    objective = make_objective(objective_name, backbone, task, budget.max_length, pooling)
    model = objective.model
    rates = cell.method.rates(cell.lr)
    if cell.method.full:
        return objective, [{"params": list(model.parameters()), "lr": rates[FULL_FINE_TUNING]}]
    model.requires_grad_(False)
    groups = []
    for part in cell.method.parts:
        delta = DELTA_TYPES[part](model, **delta_configs.get(part, {}))
        parameters = delta.delta_parameters()
        for parameter in parameters:
            parameter.requires_grad_(True)
        groups.append({"params": parameters, "lr": rates[part]})
    head = _head_parameters(model, objective.head)
    if head:
        groups.append({"params": head, "lr": rates[HEAD]})
    return objective, groups


def _head_parameters(model: nn.Module, head: list[str]) -> list[nn.Parameter]:
    chosen = [p for name, p in model.named_parameters() if any(name.startswith(h + ".") for h in head)]
    for parameter in chosen:
        parameter.requires_grad_(True)
    return chosen


def run(cell: Cell, backbone: str, objective_name: str, task: Task, budget: Budget, delta_configs: dict,
        on_point=None, pooling: str = "auto") -> dict:
    """Train ``cell``; its record (curve, best point, test scores, parameters, time).  ``on_point(step, accuracy)``
    is called at each validation point."""
    cpu, wall = time.process_time(), time.time()
    objective, groups = build(cell, backbone, objective_name, task, budget, delta_configs, pooling)
    model = objective.model
    parameters = [p for group in groups for p in group["params"]]
    steps_per_epoch = math.ceil(len(task.train) / budget.batch_size)
    total = budget.epochs * steps_per_epoch if parameters else 0  # nothing to train: evaluate as loaded
    every = max(1, steps_per_epoch // budget.evaluations_per_epoch)
    record = {"key": cell.key, "task": cell.task, "method": cell.method.name, "lr": cell.lr, "seed": cell.seed,
              "rates": cell.method.rates(cell.lr), "trainable_parameters": sum(p.numel() for p in parameters),
              "steps_per_epoch": steps_per_epoch, "threads": torch.get_num_threads(), "machine": cpu_and_versions(),
              "curve": [], "losses": []}
    best = {"accuracy": -1.0, "step": 0, "tensors": None}

    def point(step: int) -> bool:
        """Evaluate on the validation split; whether training should stop."""
        accuracy = evaluate(objective, task.validation, len(task.labels), budget.batch_size * 2)["accuracy"]
        record["curve"].append([step, accuracy])
        if on_point:
            on_point(step, accuracy)
        if accuracy > best["accuracy"]:
            best.update(accuracy=accuracy, step=step, tensors=[p.detach().clone() for p in parameters])
        model.train()
        since = sum(1 for s, _ in record["curve"] if s > best["step"])
        return since >= budget.patience

    point(0)
    if total:
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = linear_schedule(optimizer, total, 0.1)
        step, stop = 0, False
        model.train()
        for epoch in range(budget.epochs):
            for chunk in batches(epoch_order(task.train, cell.seed, epoch), budget.batch_size):
                loss = objective.loss(chunk)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record["losses"].append(round(loss.item(), 5))
                if step % every == 0 or step == total:
                    stop = point(step)
                if stop:
                    break
            if stop:
                break
        with torch.no_grad():
            for parameter, kept in zip(parameters, best["tensors"]):
                parameter.copy_(kept)
    test = evaluate(objective, task.test, len(task.labels), budget.batch_size * 2)
    return {**record, "best_step": best["step"], "validation_accuracy": best["accuracy"],
            "test_accuracy": test["accuracy"], "test_f1": test["f1"], "steps": len(record["losses"]),
            "cpu_seconds": round(time.process_time() - cpu, 2), "wall_seconds": round(time.time() - wall, 2)}
