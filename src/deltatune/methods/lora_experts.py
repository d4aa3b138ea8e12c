"""LoRA on the fused expert weights of a mixture-of-experts block (transformers' ``…Experts`` modules, which keep
every expert's projection in one 3-D parameter such as ``gate_up_proj: (E, out, in)``), one low-rank update per
expert::

    W_e <- W_e + (α/r) · B_e A_e        A: (E, r, in), B: (E, out, r), B = 0 at init

The experts' code reads its weights itself (a loop over experts, or a grouped matrix product), so the update cannot
be added to an output: the module runs with the updated weights instead (the ``weight`` route of
:mod:`deltatune.routing`), which gives every expert implementation the same numbers, and merging writes the same
update into the parameters.  A weight stored transposed (``is_transposed``: ``(E, in, out)``) gets the update
transposed.  No dropout: it acts on an input, and the update here is to a weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def expert_weights(host: nn.Module) -> list[str]:
    """The names of the host's own 3-D parameters with one matrix per expert (empty for other modules)."""
    experts = getattr(host, "num_experts", None)
    return [name for name, p in host._parameters.items()
            if p is not None and p.dim() == 3 and experts is not None and p.shape[0] == experts]


class LoraExpertsLayer(nn.Module):
    """``W_e <- W_e + (α/r) · B_e A_e`` for every expert ``e`` of each fused expert weight of one module."""

    embedding = False

    def __init__(self, host: nn.Module, r: int, alpha: float, rslora: bool) -> None:
        super().__init__()
        self.names = expert_weights(host)
        self.transposed = bool(host.is_transposed)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            weight = host._parameters[name]
            experts, rows, columns = weight.shape
            out_features, in_features = (columns, rows) if self.transposed else (rows, columns)
            factory = {"device": weight.device, "dtype": weight.dtype}
            a = torch.empty(experts, r, in_features, **factory)
            for matrix in a:  # each expert's A as a Linear's: fan-in is `in`
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, out_features, r, **factory))
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r

    def _plus_update(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight + s·B A`` for every expert, in the weight's own layout, in one pass (no ΔW the size of W)."""
        a, b = self.lora_A[name], self.lora_B[name]
        if self.transposed:  # (E, in, out): W + s·Aᵀ Bᵀ
            return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scaling)
        return torch.baddbmm(weight, b, a, alpha=self.scaling)

    def swap_in(self, host: nn.Module) -> None:
        for name in self.names:  # an instance attribute is found before nn.Module's parameter lookup
            current = host.__dict__.get(name, host._parameters[name])  # another delta's update, if any, stays
            host.__dict__[name] = self._plus_update(name, current)

    def swap_out(self, host: nn.Module) -> None:
        for name in self.names:
            host.__dict__.pop(name, None)

    def weight_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {name: self._plus_update(name, torch.zeros_like(host._parameters[name])) for name in self.names}
