"""Low-rank adapter (Mahabadi et al. 2021, "Compacter" paper): a sequential adapter whose projections have rank k.

::

    h <- h + up(act(down(h))),   down = L_d R_d  (d → m),   up = L_u R_u  (m → d),   m = d / reduction_factor

Each projection is a true matrix product of an (out × k) and a (k × in) factor, for any rank ``k`` =
``low_rank_rank``; ``L_u`` starts at zero so the model is unchanged at init.  Output -> output route.
Parameters per module: ``k·(d + m) + m  +  k·(m + d) + d``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..compat import ACTIVATIONS
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen
from .adapter import AdapterModel
from .bottleneck import LowRankLinear


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    reduction_factor: int = hyper(32, low=1, high=MAX_SIZE)
    low_rank_rank: int = hyper(1, low=1, high=MAX_SIZE)
    non_linearity: str = hyper("gelu_new", choices=ACTIVATIONS)


class LowRankAdapterModel(AdapterModel):
    """Sequential adapters with rank-``low_rank_rank`` projections and bottleneck ``d / reduction_factor``."""

    delta_type = "low_rank_adapter"
    config_class = LowRankAdapterConfig

    def bottleneck_size(self, hidden: int) -> int:
        return max(1, hidden // self.config.reduction_factor)

    def projections(self, hidden: int, bottleneck: int, seen: Seen) -> tuple[nn.Module, nn.Module]:
        k, factory = self.config.low_rank_rank, {"device": seen.device, "dtype": seen.dtype}
        return LowRankLinear(hidden, bottleneck, k, **factory), LowRankLinear(bottleneck, hidden, k, **factory)
