"""Peak memory of a training step against the batch size (the survey's Fig. 9), one fresh process per point.

In the child (``python -m deltatune.study.memory SPEC``) the model and its deltas are built, the kernel's
high-water mark of resident memory is reset (so loading does not count), three AdamW steps run on rows of
``max_length`` tokens, and the peak is printed: it covers the weights, activations, gradients and optimizer state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ..training.tasks import load_task
from .cell import Cell, build
from .protocol import Budget, parse_method


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def supported() -> bool:
    """Resetting the high-water mark needs Linux's /proc/self/clear_refs."""
    return Path("/proc/self/clear_refs").exists()


def measure(backbone: str, objective: str, task: str, method: str, batch: int, budget: Budget,
            delta_configs: dict, pooling: str = "auto") -> dict[str, float]:
    """Run the child process for one point; its ``{"before_mb", "peak_mb"}``."""
    spec = {"backbone": backbone, "objective": objective, "task": task, "method": method, "batch": batch,
            "max_length": budget.max_length, "delta_configs": delta_configs, "pooling": pooling}
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measuring the memory of {method} at batch {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> dict[str, float]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    task = load_task(spec["task"])
    budget = Budget("memory", None, None, 1, 1, 1, (0,), (1.0,), batch_size=spec["batch"],
                    max_length=spec["max_length"])
    method = parse_method(spec["method"])
    objective, groups = build(Cell(task.name, method, method.default_lr, 0), spec["backbone"], spec["objective"],
                              task, budget, spec["delta_configs"], spec["pooling"])
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups) if parameters else None
    rows = [(" ".join(["a"] * spec["max_length"]), 0)] * spec["batch"]
    objective.model.train()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_mb("VmRSS")
    for _ in range(3):
        loss = objective.loss(rows)
        if optimizer is None:
            continue
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"before_mb": round(before, 1), "peak_mb": round(rss_mb("VmHWM"), 1)}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
