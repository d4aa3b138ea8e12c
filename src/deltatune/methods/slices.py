"""Slices of fused q/k/v projections: methods that act on output features (LoRA, DoRA, (IA)³, BitFit) can adapt
only q and v of a fused ``c_attn`` / ``query_key_value`` / ``qkv_proj``, as the original LoRA did on GPT-2
(``enable_lora=[True, False, True]``), so a default means the same on fused and unfused attention.

With ``qkv_slices=["q", "v"]`` every modified module that is a fused q/k/v projection of a known layout
(:mod:`deltatune.structures.fused`) is adapted on those features only, one set of delta weights per slice; other
modified modules are adapted whole.  A fused projection of unknown layout is refused, and so is ``qkv_slices`` when
no modified module is a fused projection (it would change nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import DeltaConfig
from ..probe import from_weights
from ..structures import QKV, fused
from ..structures.infer import looks_fused


@dataclass
class SlicedConfig(DeltaConfig):
    # On fused q/k/v projections: adapt only these of "q", "k", "v" (None: the whole projection).
    qkv_slices: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qkv_slices is not None:
            wrong = [s for s in self.qkv_slices if s not in QKV]
            if wrong or not self.qkv_slices or len(set(self.qkv_slices)) != len(self.qkv_slices):
                raise ValueError(f"qkv_slices must be distinct names among {list(QKV)}, got {self.qkv_slices!r}")


def spread(values: torch.Tensor, rows: torch.Tensor | None, size: int, fill: float) -> torch.Tensor:
    """A ``size``-long vector holding ``values`` at ``rows`` and ``fill`` elsewhere (``values`` when whole)."""
    if rows is None:
        return values
    return torch.full((size,), fill, device=values.device, dtype=values.dtype).index_copy(0, rows, values)


class FusedSlices:
    """Mixin for a :class:`~deltatune.DeltaBase` method whose config is a :class:`SlicedConfig`."""

    @functools.cached_property
    def _slice_rows(self) -> dict[str, list[torch.Tensor]]:
        chosen = self.config.qkv_slices
        if chosen is None:
            return {}
        found = {}
        for position in self.positions:
            seen = from_weights(self.backbone_model.get_submodule(position))  # a linear layer's output features
            rows = fused.qkv_rows(self.backbone_model, position, seen.hidden_size) if seen else None
            if rows is None and looks_fused(position):
                attention = type(self.backbone_model.get_submodule(position.rpartition(".")[0])).__name__
                raise TypeError(f"{type(self).__name__} cannot take the {'/'.join(chosen)} slices of {position}: the "
                                f"q/k/v layout of {attention}'s fused projection is not known (known: "
                                f"{', '.join(fused.known_layouts())}); pass qkv_slices=None to adapt it whole")
            if rows is not None:
                missing = [s for s in chosen if s not in rows]
                if missing:
                    raise ValueError(f"{position} projects only {sorted(rows)}, not {missing}; check qkv_slices")
                found[position] = [rows[s] for s in chosen]
        if not found:
            raise ValueError(f"qkv_slices={chosen} is set, but none of the modified modules is a fused q/k/v "
                             f"projection of a known layout ({', '.join(fused.known_layouts())})")
        return found

    def slice_rows(self, position: str) -> list[torch.Tensor] | None:
        """The output features of each chosen slice at ``position``; None to adapt the module whole."""
        return self._slice_rows.get(position)

    def sliced_features(self, position: str) -> torch.Tensor | None:
        """All chosen output features at ``position``, sorted; None to adapt the module whole."""
        rows = self.slice_rows(position)
        return None if rows is None else torch.cat(rows).sort().values
