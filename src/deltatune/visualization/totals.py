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
        named = [(DELTA_SLOT in name.split("."), p) for name, p in model.named_parameters()]
        frozen_any = any(not in_delta and not p.requires_grad for in_delta, p in named)
        # Backbone tensors go into a checkpoint only when the rest was frozen and they were left trainable.
        saved = [p for in_delta, p in named if in_delta or (frozen_any and p.requires_grad)]
        return cls(backbone=sum(p.numel() for in_delta, p in named if not in_delta),
                   trainable=sum(p.numel() for _, p in named if p.requires_grad),
                   delta=sum(p.numel() for in_delta, p in named if in_delta),
                   checkpoint_bytes=sum(p.numel() * p.element_size() for p in saved))

    def lines(self) -> list[str]:
        # Trainable parameters are a share of all (a fully trainable backbone plus a delta is 100%, not more);
        # the delta is measured against the backbone it adapts.
        share = lambda n, whole: f"{100 * n / max(whole, 1):.4f}%"  # noqa: E731
        return [
            f"backbone parameters: {self.backbone:,}",
            f"trainable: {self.trainable:,} ({share(self.trainable, self.backbone + self.delta)} of all)   "
            f"delta: {self.delta:,} ({share(self.delta, self.backbone)} of the backbone)",
            f"delta checkpoint: {_bytes(self.checkpoint_bytes)} of tensors",
        ]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
