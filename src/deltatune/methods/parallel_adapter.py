"""Parallel adapter (He et al. 2022): a bottleneck beside a sublayer, on the input -> output route.

::

    x ──── module ─────────────────────────────┐
    └──── down (d_in → m) ── act ── up (m → d_out) ── · s ──⊕──> h = module(x) + s · up(act(down(x)))

``up`` starts at zero, so the model is unchanged at init.  ``d_in`` and ``d_out`` are read by the probe pass.
Parameters per module: ``d_in·m + m + m·d_out + d_out``.

The *pair* form takes the input of one module and adds to the output of another (He et al.'s parallel adapter
around a whole feed-forward block, say: input of ``intermediate``, added after ``output.dense``): pass
``output_modules``; the i-th match of ``modified_modules`` pairs with the i-th match of ``output_modules``.  The
input is kept by an input -> input hook on the first module and used by an output -> output hook on the second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..addressing import resolve_positions
from ..base import DeltaBase
from ..compat import ACTIVATIONS
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen
from ..routing import Route
from .adapter import hidden_state_check
from .bottleneck import Bottleneck


@dataclass
class ParallelAdapterConfig(DeltaConfig):
    bottleneck_dim: int = hyper(24, low=1, high=MAX_SIZE)
    non_linearity: str = hyper("gelu_new", choices=ACTIVATIONS)
    scaled: float = hyper(1.0, low=-1e3, high=1e3)
    # Pair form: where the adapter's output is added, one module per modified module (same addressing rules).
    output_modules: list[str] = field(default_factory=list)


class ParallelAdapterLayer(Bottleneck):
    """``h <- h + s · up(act(down(x)))``."""

    def __init__(self, *args, scaled: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaled = scaled

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        update = super().forward(x)
        if update.shape != h.shape and update.shape[-1] == h.shape[-1] and update.numel() == h.numel():
            update = update.reshape(h.shape)  # a MoE block that returns its tokens flattened (Llama 4)
        return h + self.scaled * update


class PairedAdapterLayer(ParallelAdapterLayer):
    """``h <- h + s · up(act(down(x)))`` where ``x`` was kept by :class:`KeepInput` on another module."""

    kept: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            raise RuntimeError("the paired input module did not run before the output module in this forward pass")
        x, self.kept = self.kept, None  # do not hold the activation beyond its use
        return super().forward(x, h)


class KeepInput(nn.Module):
    """``x <- x``, keeping ``x`` for the paired adapter."""

    def __init__(self, adapter: PairedAdapterLayer) -> None:
        super().__init__()
        self._adapter = (adapter,)  # a tuple: the adapter is registered (and saved) on its output module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._adapter[0].kept = x
        return x


class ParallelAdapterModel(DeltaBase):
    """Adapters in parallel with the modified modules: ``h = module(x) + scaled · up(act(down(x)))``."""

    delta_type = "parallel_adapter"
    # He et al. 2022: beside the feed-forward; the pair form where the feed-forward is no single module.
    default_positions = [{"modified_modules": ["ffn_parallel"]},
                         {"modified_modules": ["ffn_in_block"], "output_modules": ["ffn_out"]}]
    config_class = ParallelAdapterConfig
    route = Route.INPUT_OUTPUT

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["attention", "mlp"]

    @functools.cached_property
    def pairs(self) -> dict[str, str]:
        """Output position -> input position, in the pair form; empty otherwise."""
        if not self.config.output_modules:
            return {}
        inputs = super().resolve_positions()
        outputs = resolve_positions(self.backbone_model, self.config.output_modules)
        if len(inputs) != len(outputs) or set(inputs) & set(outputs):
            raise ValueError(
                f"output_modules must match as many modules as modified_modules, and other ones: {len(inputs)} "
                f"inputs ({inputs[:2]}...) vs {len(outputs)} outputs ({outputs[:2]}...)"
            )
        return dict(zip(outputs, inputs))

    def resolve_positions(self) -> list[str]:
        return [*super().resolve_positions(), *self.pairs]

    def route_at(self, position: str) -> Route:
        if position in self.pairs:
            return Route.OUTPUT_OUTPUT
        return Route.INPUT_INPUT if self.pairs else Route.INPUT_OUTPUT

    def build_all(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        """In the pair form, each adapter is made first: read at its input module, added at its output module."""
        self._paired_layers = {output: self._layer(seen[source], seen[output], PairedAdapterLayer)
                               for output, source in self.pairs.items()}
        return super().build_all(modules, seen)

    def _layer(self, source: Seen, target: Seen, kind: type[ParallelAdapterLayer]) -> ParallelAdapterLayer:
        config = self.config
        return kind(source.input_shape[-1], config.bottleneck_dim, target.hidden_size, config.non_linearity,
                    target, scaled=config.scaled)

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        hidden_state_check(self, position, module, seen)
        if position in self.pairs:
            return self._paired_layers[position]
        if seen.input_shape is None:
            raise self._unsupported(position, module, "modules that take a hidden-state tensor as input")
        if self.pairs:
            output = next(out for out, source in self.pairs.items() if source == position)
            return KeepInput(self._paired_layers[output])
        return self._layer(seen, seen, ParallelAdapterLayer)
