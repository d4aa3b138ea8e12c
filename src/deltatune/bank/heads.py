"""Row form of backbone parameters trained with a delta: each delta's own classification head.

A delta loaded with ``keep_backbone_apart=True`` holds the head it was trained with (``backbone_apart``) instead
of writing it into the shared backbone.  At each such module, a Linear, the bank hangs one :class:`HeadStack`:
the heads of all its deltas, plus the backbone's own for rows without one, stacked along a new first axis::

    h_b <- x_b W[i_b]ᵀ + b[i_b]        W: (K+1, in, width), b: (K+1, 1, width)

Heads with fewer outputs (another number of labels) are padded with zeros to the widest: row ``b`` of the output
holds its own head's outputs first, zeros after them.  The stack replaces the module's output, so it must be the
first delta to act there: another delta attached to a head module (other than the bank's own stacks) is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Route
from .stacks import Stack

HeadEntry = dict[str, torch.Tensor]  # "weight" (out, in) and, if the module has a bias, "bias" (out,)


def heads_of(delta) -> dict[str, HeadEntry]:
    """A delta's kept-apart backbone parameters, by module: ``{"classifier": {"weight": ..., "bias": ...}}``."""
    heads: dict[str, HeadEntry] = {}
    for key, tensor in delta.backbone_apart.items():
        position, _, attr = key.rpartition(".")
        heads.setdefault(position, {})[attr] = tensor
    return heads


def check_heads(name: str, delta, model: nn.Module) -> None:
    """Raise unless every kept-apart parameter of ``delta`` belongs to a Linear it can replace row by row."""
    for position, entry in heads_of(delta).items():
        host = model.get_submodule(position)
        if type(host) is not nn.Linear:
            raise TypeError(f"delta {name!r} trained {position} ({type(host).__name__}) with it; a bank serves "
                            "trained nn.Linear heads only (classifier, pooler, score)")
        expected = {"weight", "bias"} if host.bias is not None else {"weight"}
        if set(entry) != expected:
            raise ValueError(f"delta {name!r} saved {sorted(entry)} of {position}, which has {sorted(expected)}; "
                             "a head is served with all of its parameters")
        weight = entry["weight"]
        if weight.dim() != 2 or weight.shape[1] != host.in_features or (
                "bias" in entry and entry["bias"].shape != weight.shape[:1]):
            raise ValueError(f"delta {name!r} saved {position} with weight {tuple(weight.shape)}; this backbone's "
                             f"{position} takes {host.in_features} inputs")


class HeadStack(Stack):
    route = Route.INPUT_OUTPUT

    def __init__(self, entries: list[HeadEntry], host: nn.Linear) -> None:
        super().__init__()
        own = {"weight": host.weight, "bias": host.bias}
        width = max(entry["weight"].shape[0] for entry in [*entries, own])
        factory = {"device": host.weight.device, "dtype": host.weight.dtype}
        weight = torch.zeros(len(entries) + 1, host.in_features, width, **factory)
        bias = torch.zeros(len(entries) + 1, 1, width, **factory)
        with torch.no_grad():
            for k, entry in enumerate([*entries, own]):  # the last entry: the backbone's own head
                rows = entry["weight"].shape[0]
                weight[k, :, :rows] = entry["weight"].t()
                if entry.get("bias") is not None:
                    bias[k, 0, :rows] = entry["bias"]
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def mixed(self, i: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = torch.baddbmm(self.bias[i], x.reshape(len(i), -1, x.shape[-1]), self.weight[i])
        return out.view(*h.shape[:-1], out.shape[-1])
