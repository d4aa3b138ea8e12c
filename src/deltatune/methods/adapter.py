"""Sequential bottleneck adapter (Houlsby et al. 2019) on the output -> output route.

::

    h ──┬──────────────────────────────────────────┐
        └── down (d → m) ── act ── up (m → d) ──────⊕──> h + up(act(down(h)))

``up`` starts at zero, so the model's output is exactly unchanged at init.  ``d`` is whatever the modified module
outputs, read by the probe pass, so any module whose output's last dimension is a hidden size can host one.
Parameters per module: ``2·d·m + m + d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..base import DeltaBase
from ..config import DeltaConfig
from ..probe import Seen
from ..routing import Route


@dataclass
class AdapterConfig(DeltaConfig):
    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"

    def __post_init__(self) -> None:
        if not (isinstance(self.bottleneck_dim, int) and self.bottleneck_dim > 0):
            raise ValueError(f"bottleneck_dim must be a positive integer, got {self.bottleneck_dim!r}")
        if self.non_linearity not in ACT2FN:
            raise ValueError(f"unknown non_linearity {self.non_linearity!r}; choose one of {', '.join(sorted(ACT2FN))}")


class AdapterLayer(nn.Module):
    """``h <- h + up(act(down(h)))``."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, seen: Seen) -> None:
        super().__init__()
        factory = {"device": seen.device, "dtype": seen.dtype}
        self.down = nn.Linear(hidden, bottleneck, **factory)
        self.act = ACT2FN[non_linearity]
        self.up = nn.Linear(bottleneck, hidden, **factory)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterModel(DeltaBase):
    """Houlsby adapters after the modified modules: ``h <- h + up(act(down(h)))``, bottleneck ``bottleneck_dim``."""

    delta_type = "adapter"
    config_class = AdapterConfig
    route = Route.OUTPUT_OUTPUT

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["attention.output", "output"]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        if not seen.dtype.is_floating_point:
            raise self._unsupported(position, module, "modules whose output is a floating-point hidden state")
        return AdapterLayer(seen.hidden_size, self.config.bottleneck_dim, self.config.non_linearity, seen)
