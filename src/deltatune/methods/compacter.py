"""Compacter (Karimi Mahabadi et al. 2021): a sequential adapter whose projections are PHM layers.

A parameterized hypercomplex multiplication (PHM) layer builds its weight as a sum of Kronecker products::

    W = Σ_{i=1..n} A_i ⊗ B_i,    A_i: n × n  (the "rule"),    B_i = s_i t_iᵀ: (out/n) × (in/n), rank phm_rank

    h <- h + up(act(down(h))),   down: d → m,  up: m → d,   m = d / reduction_factor,   n = hypercomplex_division

With ``shared_phm_rule`` (the default, as in the paper) one rule ``A`` for all down projections and one for all up
projections is shared across every modified module.  ``s`` of the up projection starts at zero, so the model is
unchanged at init.  Output -> output route.  Parameters: per module ``r·(d + m) + m + r·(m + d) + d`` (factors and
biases), plus ``2·n³`` for the shared rules (``2·n³`` per module without sharing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import ACTIVATIONS
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen
from .adapter import AdapterModel


@dataclass
class CompacterConfig(DeltaConfig):
    reduction_factor: int = hyper(16, low=1, high=MAX_SIZE)
    hypercomplex_division: int = hyper(4, low=1, high=MAX_SIZE)
    phm_rank: int = hyper(1, low=1, high=MAX_SIZE)
    shared_phm_rule: bool = True
    phm_init_range: float = hyper(0.0001, above=0, high=1e3)
    non_linearity: str = hyper("gelu_new", choices=ACTIVATIONS)


class PHMLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = Σ_i A_i ⊗ (s_i t_iᵀ)``."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int, rule: nn.Parameter | None,
                 init_range: float, **factory) -> None:
        super().__init__()
        if in_features % n or out_features % n:
            raise ValueError(
                f"hypercomplex_division={n} must divide both sizes of a PHM layer ({in_features} → {out_features}); "
                "choose another hypercomplex_division or reduction_factor"
            )
        self.rule = rule if rule is not None else new_rule(n, **factory)
        self.left = nn.Parameter(torch.empty(n, out_features // n, rank, **factory).uniform_(-init_range, init_range))
        self.right = nn.Parameter(torch.empty(n, rank, in_features // n, **factory).uniform_(-init_range, init_range))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))

    def start_at_zero(self) -> None:
        nn.init.zeros_(self.left)

    def weight(self) -> torch.Tensor:
        n, out_n, _ = self.left.shape
        blocks = self.left @ self.right  # B_i: n × (out/n) × (in/n)
        # kron(A_i, B_i)[p·out/n + q, r·in/n + s] = A_i[p, r] · B_i[q, s], summed over i
        return torch.einsum("ipr,iqs->pqrs", self.rule, blocks).reshape(n * out_n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def new_rule(n: int, **factory) -> nn.Parameter:
    return nn.Parameter(torch.empty(n, n, n, **factory).normal_(std=0.01))


class CompacterModel(AdapterModel):
    """Adapters with PHM (sum-of-Kronecker-products) projections, bottleneck ``d / reduction_factor``."""

    delta_type = "compacter"
    config_class = CompacterConfig

    def build_all(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        """With ``shared_phm_rule``: one rule for every down projection and one for every up projection, made
        first and given to every adapter."""
        self.shared_rules = (None, None)
        if self.config.shared_phm_rule:
            weight = next(self.backbone_model.parameters())
            n, factory = self.config.hypercomplex_division, {"device": weight.device, "dtype": weight.dtype}
            self.shared_rules = new_rule(n, **factory), new_rule(n, **factory)
        return super().build_all(modules, seen)

    def bottleneck_size(self, hidden: int) -> int:
        return max(self.config.hypercomplex_division, hidden // self.config.reduction_factor)

    def projections(self, hidden: int, bottleneck: int, seen: Seen) -> tuple[nn.Module, nn.Module]:
        config = self.config
        down_rule, up_rule = self.shared_rules
        phm = functools.partial(PHMLinear, n=config.hypercomplex_division, rank=config.phm_rank,
                                init_range=config.phm_init_range, device=seen.device, dtype=seen.dtype)
        return phm(hidden, bottleneck, rule=down_rule), phm(bottleneck, hidden, rule=up_rule)
