"""BitFit (Ben Zaken et al. 2022): tune only bias terms, on the output -> output route.

Each modified module gets a trainable shift ``Δb`` (zero at init) added to its output: ``h <- f(x) + Δb``.
For a module with a bias ``b`` this is exactly tuning ``b`` (``∂L/∂Δb = ∂L/∂b`` and ``b + Δb`` is the tuned
bias), while the backbone stays untouched: detaching is exact and a checkpoint holds only ``Δb``.  Modules without
a bias (a ``Linear(bias=False)``, LLaMA projections) get one this way, as do non-linear modules (a whole
attention block, say: the shift then lands on its output).  Convolutions and their norms shift their channels
(axis 1 of an ``(N, C, H, W)`` map).  Mergeable on Linear, Conv1D, LayerNorm, convolutions and norms:
``b <- b + Δb`` (a bias is created where there was none).  Parameters per module: its output size (the chosen
features only on a fused q/k/v projection with ``qkv_slices``, see :mod:`deltatune.methods.slices`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import DeltaBase
from ..compat import Conv1D
from ..probe import Seen
from ..routing import Route
from .layout import CHANNEL_FIRST, feature_axis
from .slices import FusedSlices, SlicedConfig, spread

_MERGEABLE = (nn.Linear, Conv1D, nn.LayerNorm, *CHANNEL_FIRST)


class BiasShift(nn.Module):
    """``h <- h + Δb``."""

    adds_constant = True  # merges beside other deltas: a constant commutes with the terms they add

    def __init__(self, seen: Seen, axis: int, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.size = size = seen.output_shape[axis]
        self.register_buffer("rows", rows, persistent=False)  # only these features, on a fused q/k/v projection
        self.bias = nn.Parameter(torch.zeros(size if rows is None else len(rows), device=seen.device,
                                             dtype=seen.dtype))
        # Channel-first maps (N, C, H, W): the shift broadcasts over the axes after the channels.
        self.view = (size,) if axis == -1 else (size, *[1] * (len(seen.output_shape) - 2))

    def _full_bias(self) -> torch.Tensor:
        return spread(self.bias, self.rows, self.size, 0.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self._full_bias().view(self.view)

    def weight_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(host, _MERGEABLE):
            raise TypeError(
                f"BitFit can merge into Linear, Conv1D, LayerNorm, convolution and norm biases, not "
                f"{type(host).__name__}; "
                "keep this delta unmerged"
            )
        return {"bias": self._full_bias().detach()}


class BitFitModel(FusedSlices, DeltaBase):
    """Bias-only tuning: a zero-initialised ``Δb`` added to each modified module's output."""

    delta_type = "bitfit"
    default_positions = {"modified_modules": ["q", "k", "v", "o", "ffn_in", "ffn_out", "norm"]}
    config_class = SlicedConfig
    route = Route.OUTPUT_OUTPUT
    mergeable = True

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["query", "key", "value", "dense", "LayerNorm"]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        if not seen.dtype.is_floating_point:
            raise self._unsupported(position, module, "modules whose output is a floating-point hidden state")
        axis = feature_axis(module, seen)
        if axis is None:
            raise self._unsupported(position, module, "outputs whose channel axis is known: hidden states, "
                                    f"convolutions and norms (this one's is {list(seen.output_shape)})")
        return BiasShift(seen, axis, self.sliced_features(position))
