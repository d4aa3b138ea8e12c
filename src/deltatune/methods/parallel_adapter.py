"""Parallel adapter (He et al. 2022): a bottleneck beside a sublayer, on the input -> output route.

::

    x ──── module ─────────────────────────────┐
    └──── down (d_in → m) ── act ── up (m → d_out) ── · s ──⊕──> h = module(x) + s · up(act(down(x)))

``up`` starts at zero, so the model is unchanged at init.  ``d_in`` and ``d_out`` are read by the probe pass.
Parameters per module: ``d_in·m + m + m·d_out + d_out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig
from ..probe import Seen
from ..routing import Route
from .adapter import hidden_state_check
from .bottleneck import Bottleneck, check_activation, check_positive


@dataclass
class ParallelAdapterConfig(DeltaConfig):
    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaled: float = 1.0

    def __post_init__(self) -> None:
        check_positive("bottleneck_dim", self.bottleneck_dim)
        check_activation(self.non_linearity)


class ParallelAdapterLayer(Bottleneck):
    """``h <- h + s · up(act(down(x)))``."""

    def __init__(self, *args, scaled: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaled = scaled

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaled * super().forward(x)


class ParallelAdapterModel(DeltaBase):
    """Adapters in parallel with the modified modules: ``h = module(x) + scaled · up(act(down(x)))``."""

    delta_type = "parallel_adapter"
    config_class = ParallelAdapterConfig
    route = Route.INPUT_OUTPUT

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["attention", "mlp"]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        hidden_state_check(self, position, module, seen)
        if seen.input_shape is None:
            raise self._unsupported(position, module, "modules that take a hidden-state tensor as input")
        config = self.config
        return ParallelAdapterLayer(seen.input_shape[-1], config.bottleneck_dim, seen.hidden_size,
                                    config.non_linearity, seen, scaled=config.scaled)
