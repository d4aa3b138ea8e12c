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

from ..base import DeltaBase
from ..config import DeltaConfig
from ..probe import Seen
from ..routing import Route
from .adapter import AdapterLayer, hidden_state_check
from .bottleneck import LowRankLinear, check_activation, check_positive


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    reduction_factor: int = 32
    low_rank_rank: int = 1
    non_linearity: str = "gelu_new"

    def __post_init__(self) -> None:
        check_positive("reduction_factor", self.reduction_factor)
        check_positive("low_rank_rank", self.low_rank_rank)
        check_activation(self.non_linearity)


class LowRankAdapterModel(DeltaBase):
    """Sequential adapters with rank-``low_rank_rank`` projections and bottleneck ``d / reduction_factor``."""

    delta_type = "low_rank_adapter"
    config_class = LowRankAdapterConfig
    route = Route.OUTPUT_OUTPUT

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["attention.output", "output"]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        hidden_state_check(self, position, module, seen)
        d, config = seen.hidden_size, self.config
        m, k = max(1, d // config.reduction_factor), config.low_rank_rank
        factory = {"device": seen.device, "dtype": seen.dtype}
        projections = LowRankLinear(d, m, k, **factory), LowRankLinear(m, d, k, **factory)
        return AdapterLayer(d, m, d, config.non_linearity, seen, projections)
