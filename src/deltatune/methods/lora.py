"""LoRA (Hu et al. 2021): a trainable low-rank update beside a frozen weight, on the input -> output route.

::

        x ──────────── W (frozen) ─────────────┐
        │                                      ⊕──> h = W x + (α/r) · B A dropout(x)
        └── dropout ── A (r × in) ── B (out × r)┘

``A`` starts Kaiming-uniform and ``B`` at zero, so the model is unchanged at init.  Works on ``nn.Linear``,
transformers' ``Conv1D`` (GPT-2; weight stored transposed) and ``nn.Embedding`` (``A`` is indexed by token id,
as in PEFT: ``A`` starts at zero and ``B`` normal), and on convolutions (:mod:`deltatune.methods.lora_conv`).
Mergeable: ``W <- W + (α/r) B A``.

Options:

- ``use_rslora`` (Kalajdzievski 2023): scale by ``α/√r`` instead of ``α/r``, so the update's size does not shrink
  as the rank grows.
- ``use_dora`` (Liu et al. 2024, weight-decomposed LoRA): the adapted weight ``W' = W + s·B A`` is split into a
  direction and a trainable magnitude ``m`` (one per output feature, initialised to the row norms of ``W``)::

      h = (m / ‖W + s·B A‖_row) ⊙ (W x + s·B A x) + b

  The norm is treated as a constant in the backward pass (as in the paper and PEFT), which saves memory.
  Linear and Conv1D only.  Merging sets ``W <- m/‖W'‖ ⊙ W'``; unmerging restores the kept original weight.
- ``qkv_slices`` (:mod:`deltatune.methods.slices`): on a fused q/k/v projection, one ``(A_s, B_s)`` pair per chosen
  slice ``s``, updating only its output features: ``h[rows_s] += (α/r) · B_s A_s x``.  The default positions use
  it to adapt q and v of fused projections, as on unfused attention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..addressing import first_match
from ..base import DeltaBase
from ..compat import Conv1D
from ..config import MAX_SIZE, hyper
from ..probe import Seen
from ..routing import Route
from .lora_conv import CONVOLUTIONS, LoraConvLayer, unsupported_convolution
from .lora_experts import LoraExpertsLayer, expert_weights
from .slices import FusedSlices, SlicedConfig, spread


@dataclass
class LoraConfig(SlicedConfig):
    lora_r: int = hyper(8, low=1, high=MAX_SIZE)
    lora_alpha: float = hyper(16, above=0, high=1e5)  # the scale α/r multiplies every update: keep it sane
    lora_dropout: float = hyper(0.0, low=0, below=1)
    use_rslora: bool = False
    use_dora: bool = False
    # Per-module rank and alpha (PEFT's rank_pattern / alpha_pattern): module spec -> value, the first matching
    # spec (in order; tail names or "[r]<regex>", as modified_modules) wins, other modules take lora_r / lora_alpha.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(1 <= r <= MAX_SIZE for r in self.rank_pattern.values()):
            raise ValueError(f"rank_pattern values must be >= 1 and <= {MAX_SIZE}, as lora_r, got {self.rank_pattern}")
        if not all(0 < a <= 1e5 for a in self.alpha_pattern.values()):
            raise ValueError(f"alpha_pattern values must be > 0 and <= 100000, as lora_alpha, got {self.alpha_pattern}")


# Up to this many rows (tokens) an update costs least as two small kernels; beyond, as one fused addmm
# (measured on CPU: 4 µs saved per module for one token, 20% lost at 1,024 tokens).
_FEW_ROWS = 512


class LoraLayer(nn.Module):
    """``h <- h + (α/r) · dropout(x) Aᵀ Bᵀ`` for one Linear, Conv1D or Embedding."""

    def __init__(self, host: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, dora: bool,
                 slices: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        weight = host.weight
        self.embedding = isinstance(host, nn.Embedding)
        self.transposed = isinstance(host, Conv1D)
        # Linear stores (out, in); Conv1D stores (in, out); Embedding (num_embeddings, dim) maps ids -> dim.
        in_features, out_features = weight.shape if self.transposed or self.embedding else weight.shape[::-1]
        self.out_features, self.r = out_features, r
        self.padding_idx = host.padding_idx if self.embedding else None
        factory = {"device": weight.device, "dtype": weight.dtype}
        # Slices of a fused projection: A stacks one (r × in) block per slice, B one (rows_s × r) block per slice.
        rows = blocks = None
        if slices is not None:
            rows = torch.cat(slices).to(weight.device)
            blocks = torch.cat([torch.full_like(r, i) for i, r in enumerate(slices)]).to(weight.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("blocks", blocks, persistent=False)
        count = 1 if slices is None else len(slices)
        self.lora_A = nn.Parameter(torch.empty(count * r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features if slices is None else len(self.rows), r, **factory))
        if self.embedding:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in is `in`: each slice's A as if alone
            nn.init.zeros_(self.lora_B)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 and not self.embedding else None
        self.magnitude = None
        if dora:
            self._host = (host,)  # a tuple, so the host is not registered as a submodule of its own delta
            norms = self._host_weight().detach().norm(dim=1)
            self.magnitude = nn.Parameter(norms if self.rows is None else norms[self.rows])
        self.plain = slices is None and not dora  # the hot path (a plain attribute: read at every call)

    def _full_B(self) -> torch.Tensor:
        """B as one (out × count·r) matrix: each slice's block on its rows and its columns, zero elsewhere."""
        if self.rows is None:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, len(self.lora_A) // self.r, self.r)
        return full.index_put((self.rows, self.blocks), self.lora_B).flatten(1)

    def _host_weight(self) -> torch.Tensor:
        """The host's weight in (out, in) layout."""
        weight = self._host[0].weight
        return weight.t() if self.transposed else weight

    def _dora_scale(self, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """m / ‖W + s·B A‖ per output row; one on rows outside the slices."""
        lora_B = self._full_B() if lora_B is None else lora_B
        adapted = self._host_weight() + self.scaling * (lora_B @ self.lora_A)
        norms = adapted.norm(dim=1).detach()
        if self.rows is None:
            return self.magnitude / norms
        return spread(self.magnitude / norms[self.rows], self.rows, self.out_features, 1.0)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            a = F.embedding(x, self.lora_A.t(), padding_idx=self.padding_idx)
        else:
            a = F.linear(self.dropout(x) if self.dropout is not None else x, self.lora_A)
        if self.plain and h.numel() > _FEW_ROWS * self.out_features:
            # Many rows: one fused kernel for h + scaling · a Bᵀ, which saves a pass over the output.
            flat = torch.addmm(h.reshape(-1, h.shape[-1]), a.reshape(-1, self.r), self.lora_B.t(), alpha=self.scaling)
            return flat.view(h.shape)
        lora_B = self.lora_B if self.plain else self._full_B()
        if self.magnitude is None:
            return torch.add(h, F.linear(a, lora_B), alpha=self.scaling)
        bias = self._host[0].bias  # h = W x + b: the magnitude rescales W x and the update, not b
        update = F.linear(a, lora_B) * self.scaling
        tuned = self._dora_scale(lora_B) * (h + update if bias is None else h - bias + update)
        tuned = tuned if bias is None else tuned + bias
        if self.rows is None:
            return tuned
        return h.index_copy(-1, self.rows, tuned.index_select(-1, self.rows))  # other rows stay exact

    @property
    def needs_exact_unmerge(self) -> bool:
        # DoRA's merged weight is a rescaling of W: W cannot be recovered by subtracting an update.
        return self.magnitude is not None

    def weight_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        delta = (self._full_B() @ self.lora_A) * self.scaling  # out × in
        if self.magnitude is not None:
            weight = self._host_weight()
            delta = self._dora_scale()[:, None] * (weight + delta) - weight
        return {"weight": delta.t() if self.transposed or self.embedding else delta}


class LoraModel(FusedSlices, DeltaBase):
    """Low-rank adaptation of Linear, Conv1D, Embedding and convolution modules:
    ``h = W x + (lora_alpha/lora_r) · B A x``.

    Parameters per module: ``lora_r · (in + out)``, plus ``out`` with ``use_dora`` (per slice of a fused
    projection: ``lora_r · (in + rows)``, plus ``rows``; on a convolution ``lora_r · (in · kernel + out)``).
    """

    delta_type = "lora"
    default_positions = {"modified_modules": ["q", "v"]}
    config_class = LoraConfig
    route = Route.INPUT_OUTPUT
    mergeable = True

    def export_peft(self, save_directory):
        """Write this delta in PEFT's format (see :mod:`deltatune.peft_format`)."""
        from ..peft_format import export_peft

        return export_peft(self, save_directory)

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        config = self.config
        if isinstance(module, CONVOLUTIONS):
            return self._build_convolution(position, module)
        if expert_weights(module):
            return self._build_experts(position, module)
        if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            raise self._unsupported(position, module, "nn.Linear, transformers Conv1D, nn.Embedding and "
                                                      "nn.Conv1d/2d/3d")
        if config.use_dora and isinstance(module, nn.Embedding):
            raise self._unsupported(position, module, "nn.Linear and transformers Conv1D when use_dora=True")
        r, alpha = self.rank_and_alpha[position]
        return LoraLayer(module, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                         self.slice_rows(position))

    def _build_convolution(self, position: str, module: nn.Module) -> LoraConvLayer:
        config = self.config
        if config.use_dora:
            raise self._unsupported(position, module, "nn.Linear and transformers Conv1D when use_dora=True")
        why = unsupported_convolution(module)
        if why:
            raise TypeError(f"LoraModel cannot modify {position} ({type(module).__name__}): {why}. Choose other "
                            "modified_modules or add exclude_modules.")
        return LoraConvLayer(module, *self.rank_and_alpha[position], config.lora_dropout, config.use_rslora)

    def _build_experts(self, position: str, module: nn.Module) -> LoraExpertsLayer:
        config = self.config
        if not hasattr(module, "is_transposed"):
            raise TypeError(f"LoraModel cannot modify {position} ({type(module).__name__}): its expert weights "
                            f"{expert_weights(module)} do not say their layout (transformers' is_transposed)")
        if config.use_dora or config.lora_dropout or self.slice_rows(position) is not None:
            raise ValueError(f"LoRA on the fused expert weights of {position} takes neither use_dora, lora_dropout "
                             "nor qkv_slices")
        return LoraExpertsLayer(module, *self.rank_and_alpha[position], config.use_rslora)

    def route_at(self, position: str) -> Route:
        return Route.WEIGHT if isinstance(self.deltas.get(position), LoraExpertsLayer) else self.route

    @functools.cached_property
    def rank_and_alpha(self) -> dict[str, tuple[int, float]]:
        """Each position's (r, α): from the first entry of rank_pattern / alpha_pattern that matches it, else the
        config's lora_r / lora_alpha.  An entry that decides no position (it matches none, or only positions an
        earlier entry took) is refused, as a spec that matches nothing is."""
        config, values = self.config, {}
        for name, pattern, default in (("rank_pattern", config.rank_pattern, config.lora_r),
                                       ("alpha_pattern", config.alpha_pattern, config.lora_alpha)):
            chosen = {p: first_match(pattern, p) for p in self.positions}
            idle = [k for k in pattern if k not in chosen.values()]
            if idle:
                raise ValueError(f"{name} entries {idle} decide the value of no position: they match none of the "
                                 f"delta's {len(self.positions)} positions (e.g. {self.positions[0]!r}), or only ones "
                                 "an earlier entry took")
            values[name] = {p: default if key is None else pattern[key] for p, key in chosen.items()}
        return {p: (values["rank_pattern"][p], values["alpha_pattern"][p]) for p in self.positions}
