"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

Keys and values are rescaled on the output side, the feed-forward's inner activation on the input side of its
output projection::

    k <- l_k ⊙ k          (output -> output on the key / value projections)
    v <- l_v ⊙ v
    x <- l_ff ⊙ x         (input -> input on the modules named in feedforward_modules, e.g. the FFN down projection)

On a fused q/k/v projection the default rescales the k and v features only (``qkv_slices``, see
:mod:`deltatune.methods.slices`).  At init every ``l`` is one, so the model is exactly unchanged.  Parameters per
module: its output size (or input size for feed-forward modules).  Mergeable into Linear and Conv1D: ``W <- diag(l) W, b <- l ⊙ b`` on the output side,
``W <- W diag(l)`` on the input side; being a rescaling, unmerging restores the kept original weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..addressing import resolve_positions
from ..base import DeltaBase
from ..compat import Conv1D
from ..probe import Seen
from ..routing import Route
from .layout import CHANNEL_FIRST, channel_last_check
from .slices import FusedSlices, SlicedConfig, spread


@dataclass
class IA3Config(SlicedConfig):
    # Positions (among the modified ones) whose *input* is rescaled; same addressing rules as modified_modules.
    feedforward_modules: list[str] = field(default_factory=list)


class Rescale(nn.Module):
    """``t <- t ⊙ l`` on a module's input (``on_input``) or output."""

    needs_exact_unmerge = True

    def __init__(self, size: int, on_input: bool, seen: Seen, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.on_input, self.size = on_input, size
        self.register_buffer("rows", rows, persistent=False)  # only these features, on a fused q/k/v projection
        self.scale = nn.Parameter(torch.ones(size if rows is None else len(rows), device=seen.device,
                                             dtype=seen.dtype))

    def _full_scale(self) -> torch.Tensor:
        return spread(self.scale, self.rows, self.size, 1.0)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self._full_scale()

    def weight_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(host, (nn.Linear, Conv1D)):
            raise TypeError(f"(IA)³ can merge into Linear and Conv1D, not {type(host).__name__}; keep it unmerged")
        weight, factor = host.weight.detach(), self._full_scale().detach() - 1
        # Linear stores (out, in), Conv1D (in, out): pick the axis of the rescaled features.
        rows = self.on_input == isinstance(host, Conv1D)
        update = {"weight": weight * (factor[:, None] if rows else factor[None, :])}
        if not self.on_input and host.bias is not None:
            update["bias"] = host.bias.detach() * factor
        return update


class IA3Model(FusedSlices, DeltaBase):
    """Rescale keys, values (outputs) and feed-forward activations (inputs of ``feedforward_modules``) by ``l``."""

    delta_type = "ia3"
    # MoE experts stored as fused 3-D tensors have no feed-forward output module: keys and values only.
    default_positions = [{"modified_modules": ["k", "v", "ffn_out"], "feedforward_modules": ["ffn_out"]},
                         {"modified_modules": ["k", "v"]}]
    config_class = IA3Config
    route = Route.OUTPUT_OUTPUT
    mergeable = True

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["key", "value", "output.dense"]

    @functools.cached_property
    def feedforward_positions(self) -> set[str]:
        specs = self.config.feedforward_modules
        found = set(resolve_positions(self.backbone_model, specs)) if specs else set()
        stray = sorted(found - set(self.positions))
        if stray:
            raise ValueError(f"feedforward_modules must be among the modified modules; not modified: {stray[:5]}")
        return found

    def route_at(self, position: str) -> Route:
        return Route.INPUT_INPUT if position in self.feedforward_positions else Route.OUTPUT_OUTPUT

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        on_input = self.route_at(position) is Route.INPUT_INPUT
        if on_input and seen.input_shape is None:
            raise self._unsupported(position, module, "feed-forward modules that take a tensor input")
        if on_input and isinstance(module, CHANNEL_FIRST):
            raise self._unsupported(position, module, "modules that take their features on the last axis")
        if not on_input:
            channel_last_check(self, position, module, seen)
        rows = None if on_input else self.sliced_features(position)
        return Rescale(seen.input_shape[-1] if on_input else seen.hidden_size, on_input, seen, rows)
