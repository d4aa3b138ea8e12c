"""Common names for a model no family file maps, inferred from its structure.

The repeated block list is the ``ModuleList`` with the most children of one class.  Inside its first block, linear
layers (``nn.Linear`` / ``Conv1D``) are classified by name and shape: square projections under a module whose name
mentions attention are q, k, v, o (by name — q/query, k/key, v/value, o/out — or else in order), a projection that
widens the hidden size is the feed-forward's input and one that narrows back to it the feed-forward's output.
Anything not found is left out; a model without a block list or without q and v is not inferred at all.
"""

from __future__ import annotations

import re

from torch import nn

from ..addressing import DELTA_SLOT
from ..compat import Conv1D

_ROLES = {"q": r"q|query|q_proj|q_lin|wq|to_q", "k": r"k|key|k_proj|k_lin|wk|to_k",
          "v": r"v|value|v_proj|v_lin|wv|to_v", "o": r"o|out|o_proj|out_proj|out_lin|wo|to_out|proj|dense"}


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    return max(candidates, key=lambda item: len(item[1]), default=None)


def _shape(linear: nn.Module) -> tuple[int, int]:
    """(in, out)."""
    return tuple(linear.weight.shape) if isinstance(linear, Conv1D) else tuple(linear.weight.shape[::-1])


def infer_common_names(model: nn.Module) -> dict[str, list[str]] | None:
    found = _block_list(model)
    if found is None:
        return None
    list_name, blocks = found
    own = [(n, m) for n, m in blocks[0].named_modules() if DELTA_SLOT not in n.split(".")]  # not other deltas
    linears = {n: m for n, m in own if isinstance(m, (nn.Linear, Conv1D))}
    square = {n: m for n, m in linears.items() if _shape(m)[0] == _shape(m)[1]}
    hidden = next((_shape(m)[0] for m in square.values()), None)
    attention = [n for n in square if re.search("att", n, re.IGNORECASE)]
    names: dict[str, list[str]] = {}
    for role, pattern in _ROLES.items():
        hits = [n for n in attention if re.fullmatch(pattern, n.rsplit(".", 1)[-1], re.IGNORECASE)]
        if hits:
            names[role] = hits[:1] if role != "o" else hits[-1:]
    if not {"q", "v"} <= names.keys() and len(attention) >= 3:  # unnamed: q, k, v, o in order
        names.update(zip("qkvo", ([n] for n in attention)))
    if not {"q", "v"} <= names.keys():
        return None
    widen = [n for n, m in linears.items() if _shape(m)[0] == hidden and _shape(m)[1] > hidden]
    narrow = [n for n, m in linears.items() if _shape(m)[1] == hidden and _shape(m)[0] > hidden]
    if widen and narrow:
        names["ffn_in"], names["ffn_out"] = widen, narrow[-1:]
        parent = narrow[-1].rpartition(".")[0]
        names["ffn_in_block"] = [parent] if parent and widen[0].startswith(parent + ".") else widen[:1]
        names["ffn_block_out"] = [parent] if parent else narrow[-1:]
    attention_module = names["q"][0].rpartition(".")[0]
    if attention_module:
        names["attn"] = names["attn_out"] = [attention_module]
    names["norm"] = [n for n, m in own if "norm" in type(m).__name__.lower()]
    prefix = re.escape(list_name) + r"\.\d+\."
    return {role: [f"[r]{prefix}{re.escape(n)}" for n in relative] for role, relative in names.items()}
