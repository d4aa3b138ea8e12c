"""Prefix tuning on attention that takes no KV cache (DistilBERT, ALBERT, MPNet, ...): ``n`` extra rows in front
of each attention's input, whose keys and values are the layer's prefix.

::

    attention([0; x]), with k([0; x])[:n] = K_l and v([0; x])[:n] = V_l, then its first n output rows dropped
        = softmax(q(x) [K_l; k(x)]ᵀ / √d) [V_l; v(x)]   for every real query

The rows enter as zeros and leave again; only their keys and values, overwritten by the prefix, reach the real
tokens, through attention.  Rotary position embeddings get identity rotations for the rows, so prefix keys stay
free of position as a cached prefix's are.  That holds where the attention does nothing else along the sequence (no
relative position terms computed for its input length, no window or convolution over it).  :func:`check_hidden_prefix` tests it when the
delta is built: with the prefix hidden by the mask, the model must give its bare output, or prefix tuning is
refused for it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from ..addressing import resolve_positions
from ..probe import evaluating, first_tensor
from ..routing import _positional_names
from ..structures import common_names


def row_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Attention -> (key, value projection) where the model takes no KV cache (both the fused q/k/v projection
    where it has one); empty where it takes a cache."""
    base = getattr(model, "base_model", model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or compat.cache_argument(model) \
            or compat.cache_argument(base):
        return {}
    name = type(model).__name__
    try:
        names = common_names(model)[1]
    except ValueError as error:
        raise compat.CompatibilityError(
            f"PrefixModel needs a model that takes a KV cache argument ({' or '.join(compat.CACHE_ARGUMENTS)}) "
            f"or attention whose key and value projections it finds by their common names; "
            f"{str(error).split('; pass')[0]}") from None
    if names.get("qkv") and not (names.get("k") or names.get("v")):  # fused: keys and values are slices of it
        return {p.rpartition(".")[0]: (p, p) for p in resolve_positions(model, names["qkv"])}
    if not (names.get("k") and names.get("v")):
        raise TypeError(f"PrefixModel needs the key and value projections of {name}'s attention (takes no KV "
                        f"cache); its common names are {sorted(names)}")
    keys, values = (resolve_positions(model, names[role]) for role in ("k", "v"))
    layers = {}
    for key in keys:
        attention = key.rpartition(".")[0]
        value = next((v for v in values if v.rpartition(".")[0] == attention), None)
        if value is None:
            raise TypeError(f"PrefixModel found no value projection beside {key} in {name}")
        layers[attention] = (key, value)
    return layers


def _extended(mask: torch.Tensor | None, n: int, visible: bool, like: torch.Tensor) -> torch.Tensor | None:
    """``mask`` with ``n`` key columns on the left (visible or hidden) and, for per-query masks, ``n`` query rows
    that see everything (their outputs are dropped)."""
    batch, length = like.shape[:2]
    if mask is None:
        if visible:
            return None
        mask = like.new_zeros(batch, 1, 1, length)  # additive: every key visible
    if mask.dtype == torch.bool:
        shown, hidden = True, False
    elif mask.dim() == 2 or not mask.is_floating_point():  # a padding mask, 1 for a token to attend to
        shown, hidden = 1, 0
    else:  # an additive mask
        shown, hidden = 0, torch.finfo(mask.dtype).min
    if mask.dim() not in (2, 4):
        raise TypeError(f"prefix rows extend 2-D padding masks and 4-D attention masks, not {tuple(mask.shape)}")
    mask = torch.cat([mask.new_full((*mask.shape[:-1], n), shown if visible else hidden), mask], dim=-1)
    if mask.dim() == 4 and mask.shape[-2] > 1:
        mask = torch.cat([mask.new_full((*mask.shape[:-2], n, mask.shape[-1]), shown), mask], dim=-2)
    return mask


def _unrotated_rows(cos: torch.Tensor, sin: torch.Tensor, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary ``(cos, sin)`` with ``n`` identity rotations in front (cos 1, sin 0): the prefix keys stay as trained,
    free of position, as a cached prefix is."""
    if cos.shape[-2] != length:
        raise TypeError(f"rotary position embeddings of shape {tuple(cos.shape)} do not run along the input's "
                        f"{length} tokens on their second-to-last axis")
    ones, zeros = cos.new_ones((*cos.shape[:-2], n, cos.shape[-1])), sin.new_zeros((*sin.shape[:-2], n, sin.shape[-1]))
    return torch.cat([ones, cos], dim=-2), torch.cat([zeros, sin], dim=-2)


class PrefixRows(nn.Module):
    """On one attention module: ``n`` zero rows in front of its hidden-state inputs, its mask extended, and the
    rows dropped from its output again.  The first one holds the prefix table of all layers."""

    rewrites_call = True
    exclusive = True

    def __init__(self, n: int, attention: nn.Module, table: nn.Module | None = None) -> None:
        super().__init__()
        self.length = n
        self.first_input = _positional_names(type(attention))[0]
        self.mask_name = compat.attention_mask_argument(attention)
        self.visible = True  # False while checking: the mask hides the prefix
        if table is not None:
            self.table = table

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        x = kwargs[self.first_input]
        zeros = x.new_zeros(x.shape[0], self.length, *x.shape[2:])
        for name, value in kwargs.items():  # DistilBERT passes the hidden state as query, key and value
            if isinstance(value, torch.Tensor) and value.shape == x.shape and value.is_floating_point():
                kwargs[name] = torch.cat([zeros, value], dim=1)
        kwargs[self.mask_name] = _extended(kwargs.get(self.mask_name), self.length, self.visible, x)
        rotary = kwargs.get("position_embeddings")
        if isinstance(rotary, tuple) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary):
            kwargs["position_embeddings"] = _unrotated_rows(*rotary, self.length, x.shape[1])
        return args, kwargs

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, self.length:]


class PrefixKeysValues(nn.Module):
    """On a key or value projection, or a fused q/k/v one: the first ``n`` output rows (from the zero rows) take the
    layer's prefix keys and/or values, on all output features or on the given ones (a fused projection's slices)."""

    def __init__(self, table: nn.Module, layer: int, keys: torch.Tensor | bool, values: torch.Tensor | bool) -> None:
        super().__init__()
        self._table = [table]  # in a list: the table belongs to the layer's PrefixRows
        self.layer, self.targets = layer, (keys, values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        table = self._table[0]
        first = h[:, :table.length]
        for prefix, target in zip(table.key_values(range(self.layer, self.layer + 1))[0], self.targets):
            prefix = prefix.expand(h.shape[0], -1, -1).to(h.dtype)  # (batch, n, features)
            if target is True:
                first = prefix
            elif target is not False:
                first = first.index_copy(-1, target.to(h.device), prefix)
        return torch.cat([first, h[:, table.length:]], dim=1)


def check_hidden_prefix(model: nn.Module, rows: list[PrefixRows], attach, detach, inputs: dict) -> None:
    """Refuse the model unless, with the prefix hidden by the mask, it gives its bare output (see above)."""
    name = type(model).__name__
    try:
        with evaluating(model):
            bare = first_tensor(model(**inputs))
            attach()
            try:
                for delta in rows:
                    delta.visible = False
                hidden = first_tensor(model(**inputs))
            finally:
                for delta in rows:
                    delta.visible = True
                detach()
    except Exception as error:
        raise TypeError(f"PrefixModel adds prefix rows to {name}'s attention, which it does not run with them "
                        f"({type(error).__name__}: {error})") from error
    if not torch.allclose(hidden, bare, atol=1e-5, rtol=1e-4):
        raise TypeError(f"{name}'s attention does more along the sequence than attend (positions, windows or "
                        f"convolutions over it): with the prefix rows hidden its output moves by "
                        f"{(hidden - bare).abs().max().item():.2g}, so prefix rows would change more than the "
                        "prefix; PrefixModel refuses it")
