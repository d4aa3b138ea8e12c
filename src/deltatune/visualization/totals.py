"""Parameter totals of a backbone with deltas attached: backbone, trainable, delta, and the delta's bytes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..addressing import DELTA_SLOT


@dataclass(frozen=True)
class Totals:
    backbone: int  # parameters of the backbone itself
    trainable: int  # parameters that require grad, delta ones included
    delta: int  # parameters inside delta slots
    checkpoint_bytes: int  # tensor bytes a delta checkpoint holds: delta tensors and trainable backbone tensors

    @classmethod
    def of(cls, model: nn.Module) -> Totals:
        backbone = trainable = delta = size = 0
        frozen_any = False
        for name, param in model.named_parameters():
            in_delta = DELTA_SLOT in name.split(".")
            delta += param.numel() if in_delta else 0
            backbone += 0 if in_delta else param.numel()
            trainable += param.numel() if param.requires_grad else 0
            frozen_any |= not param.requires_grad and not in_delta
        for name, param in model.named_parameters():
            in_delta = DELTA_SLOT in name.split(".")
            # Backbone tensors go into a checkpoint only when the rest was frozen and they were left trainable.
            if in_delta or (frozen_any and param.requires_grad):
                size += param.numel() * param.element_size()
        return cls(backbone, trainable, delta, size)

    def lines(self) -> list[str]:
        ratio = lambda n: f"{100 * n / max(self.backbone, 1):.4f}%"  # noqa: E731
        return [
            f"backbone parameters: {self.backbone:,}",
            f"trainable: {self.trainable:,} ({ratio(self.trainable)})   delta: {self.delta:,} ({ratio(self.delta)})",
            f"delta checkpoint: {_bytes(self.checkpoint_bytes)} of tensors",
        ]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
