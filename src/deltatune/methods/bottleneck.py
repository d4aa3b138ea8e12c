"""The bottleneck ``up(act(down(t)))`` shared by the adapter family, with full or low-rank projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat
from ..probe import Seen


class LowRankLinear(nn.Module):
    """``y = x (L R)ᵀ + b`` with ``L`` (out × k) and ``R`` (k × in): a Linear whose weight has rank ``k``."""

    def __init__(self, in_features: int, out_features: int, rank: int, **factory) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.right = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        nn.init.kaiming_uniform_(self.right, a=math.sqrt(5))
        nn.init.normal_(self.left, std=1e-2)

    def start_at_zero(self) -> None:
        nn.init.zeros_(self.left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right), self.left, self.bias)


class Bottleneck(nn.Module):
    """``up(act(down(t)))``, ``down``: in → m, ``up``: m → out; ``up`` starts at zero so the output starts at 0."""

    def __init__(self, in_features: int, bottleneck: int, out_features: int, non_linearity: str, seen: Seen,
                 projections: tuple[nn.Module, nn.Module] | None = None) -> None:
        """``projections``: (down, up) modules with a ``start_at_zero()`` method instead of plain Linears."""
        super().__init__()
        if projections is None:
            factory = {"device": seen.device, "dtype": seen.dtype}
            self.down = nn.Linear(in_features, bottleneck, **factory)
            self.up = nn.Linear(bottleneck, out_features, **factory)
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
        else:
            self.down, self.up = projections
            self.up.start_at_zero()
        nn.init.zeros_(self.up.bias)
        self.act = compat.activation(non_linearity)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(t)))
