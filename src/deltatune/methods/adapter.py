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

from ..base import DeltaBase
from ..compat import ACTIVATIONS
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen
from ..routing import Route
from .bottleneck import Bottleneck
from .layout import channel_last_check


@dataclass
class AdapterConfig(DeltaConfig):
    bottleneck_dim: int = hyper(24, low=1, high=MAX_SIZE)
    non_linearity: str = hyper("gelu_new", choices=ACTIVATIONS)


class AdapterLayer(Bottleneck):
    """``h <- h + up(act(down(h)))``."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h)


def hidden_state_check(method: DeltaBase, position: str, module: nn.Module, seen: Seen) -> None:
    if not seen.dtype.is_floating_point:
        raise method._unsupported(position, module, "modules whose output is a floating-point hidden state")
    channel_last_check(method, position, module, seen)


class AdapterModel(DeltaBase):
    """Houlsby adapters after the modified modules: ``h <- h + up(act(down(h)))``, bottleneck ``bottleneck_dim``."""

    delta_type = "adapter"
    # In common names (deltatune.structures); Houlsby et al. 2019: after attention and after the feed-forward.
    default_positions = {"modified_modules": ["attn_out", "ffn_block_out"]}
    config_class = AdapterConfig
    route = Route.OUTPUT_OUTPUT

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["attention.output", "output"]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        hidden_state_check(self, position, module, seen)
        d = seen.hidden_size
        m = self.bottleneck_size(d)
        return AdapterLayer(d, m, d, self.config.non_linearity, seen, self.projections(d, m, seen))

    # Variants of the sequential adapter override these two.
    def bottleneck_size(self, hidden: int) -> int:
        return self.config.bottleneck_dim

    def projections(self, hidden: int, bottleneck: int, seen: Seen) -> tuple[nn.Module, nn.Module] | None:
        """(down, up) modules; None for plain Linears."""
        return None
