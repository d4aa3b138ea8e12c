"""When a merge is refused: only merges that compute what the unmerged deltas compute, and that an unmerge can undo.

- Tied weights (GPT-2's ``wte`` is also its ``lm_head``): folding an update into one changes the others.
- Parametrized weights (``weight_norm``, as on wav2vec2's positional convolution): ``module.weight`` is computed
  from other tensors at each access, so an update added to it would be lost.
- Composition on one module: merging moves a delta's term into the module's own output.  An input -> output term
  (plain LoRA) is added beside the other deltas' terms either way; a constant added to the output (BitFit) too,
  unless another delta rewrites the output before it; a rescaling (DoRA, (IA)³) would no longer apply to the other
  deltas' terms, so it merges only alone.
- Kept copies: a delta merged with a copy of the weights (``exact=True``, DoRA, (IA)³) restores that copy at
  unmerge, which would undo any merge made after it; such merges do not share a module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.utils import parametrize

from . import live
from .routing import Route

if TYPE_CHECKING:
    from .base import DeltaBase


def check(delta: DeltaBase, exact: bool, updates: dict[str, list[str]]) -> None:
    """Raise ``RuntimeError`` (before anything changes) if merging ``delta``, which updates the attributes
    ``updates[position]`` of each host, would be wrong."""
    tied: dict[int, list[str]] = {}
    for key, parameter in delta.backbone_model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(key)
    for position, attrs in updates.items():
        for attr in attrs:
            if parametrize.is_parametrized(delta._hosts[position], attr):
                raise RuntimeError(f"cannot merge {delta.name!r}: {position}.{attr} is parametrized (computed from "
                                   "other tensors, e.g. by weight_norm), so an update added to it would be lost; "
                                   "keep this delta unmerged")
            names = tied.get(id(getattr(delta._hosts[position], attr, None)), [])
            if len(names) > 1:
                raise RuntimeError(f"cannot merge {delta.name!r}: {names[0]} is tied to {names[1:]}, so folding the "
                                   "update into it would change those too; keep this delta unmerged")
    rescales = any(getattr(d, "needs_exact_unmerge", False) for d in delta.deltas.values())  # DoRA, (IA)³
    keeps = exact or rescales  # a copy of the weights, restored at unmerge
    for other in live.deltas_on(delta.backbone_model):
        shared = sorted(set(delta.positions) & set(other.positions))
        if other is delta or not (other.attached or other.merged) or not shared:
            continue
        other_keeps = other.merged and any(isinstance(saved, torch.Tensor) for p in shared
                                           for saved in other._merge_state.get(p, {}).values())
        if other_keeps or (keeps and other.merged):
            why = "one unmerge would restore weights from before the other's merge"
        elif rescales or not all(_commutes(delta, p, other) for p in shared):
            why = "folded into the weights it would no longer compose with it as it does unmerged (beside other " \
                  "deltas only additive terms merge: plain LoRA, and BitFit after no other output rewrite)"
        else:
            continue
        raise RuntimeError(f"cannot merge {delta.name!r} while {type(other).__name__} {other.name!r} also acts on "
                           f"{shared[0]}: {why}; detach or unmerge {other.name!r} first")


def _commutes(delta: DeltaBase, position: str, other: DeltaBase) -> bool:
    """Whether moving ``delta``'s term into the module's output leaves ``other``'s computation at ``position``."""
    if delta.route_at(position) in (Route.INPUT_OUTPUT, Route.WEIGHT):  # a term beside the others; W + ΔW itself
        return True
    earlier_rewrite = other.attached and other.route_at(position) is Route.OUTPUT_OUTPUT and other.order < delta.order
    return getattr(delta.deltas[position], "adds_constant", False) and not earlier_rewrite
