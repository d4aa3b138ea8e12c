"""PEFT's LoRA on fused expert weights (``target_parameters``), both ways, as :class:`~deltatune.LoraModel`'s
:class:`~deltatune.methods.lora_experts.LoraExpertsLayer`.

PEFT wraps each targeted 3-D parameter of an experts module in a ``ParamWrapper``; several on one module nest, the
module's first parameter innermost, so their tensors are named ``<module>.base_layer.lora_A.weight`` (first of two)
and ``<module>.lora_A.weight`` (second), with no parameter name.  Its factors for ``E`` experts of rank ``r``:

    lora_A.weight: (E·r, in), expert-major rows        -> A_e = rows e·r … e·r + r - 1
    lora_B.weight: (out, r·E), columns rank-major      -> B_e[:, j] = column j·E + e

Reading, each nested pair is matched to the module's expert weight of its shape (a weight whose shape another
shares is refused, as the names cannot tell them apart); every expert weight of the module must be targeted, since
deltatune adapts them all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .methods.lora_experts import LoraExpertsLayer, expert_weights

NESTED = "base_layer."


def _sizes(host: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, in, out) of one expert weight."""
    experts, rows, columns = host._parameters[name].shape
    return (experts, rows, columns) if host.is_transposed else (experts, columns, rows)


def _module_and_depth(position: str) -> tuple[str, int]:
    depth = 0
    while position.endswith("." + NESTED[:-1]):
        position, depth = position[:-len(NESTED)], depth + 1
    return position, depth


def read(tensors: dict[str, torch.Tensor], lora_position, backbone: nn.Module, source: Path
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split an adapter's tensors into the others and the expert factors (renamed to ``deltas.<module>.lora_A.
    <weight>``, in deltatune's layout), and the experts modules they adapt."""
    modules = dict(backbone.named_modules())
    pairs: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    others = {}
    for key, tensor in tensors.items():
        position = lora_position(key)
        module, depth = _module_and_depth(position) if position else (None, 0)
        if module in modules and expert_weights(modules[module]):
            factor = "lora_A" if ".lora_A." in key else "lora_B"
            pairs.setdefault(module, {}).setdefault(depth, {})[factor] = tensor
        else:
            others[key] = tensor
    ours = {}
    for module, by_depth in pairs.items():
        host = modules[module]
        names = expert_weights(host)
        shapes = {name: _sizes(host, name) for name in names}
        if len(set(shapes.values())) < len(names) or len(by_depth) != len(names):
            raise ValueError(f"{source}: the LoRA factors on {module} cannot be matched to its expert weights "
                             f"{names} (shapes {shapes}): PEFT's names do not say which is which, and deltatune "
                             "adapts every expert weight of a module")
        for pair in by_depth.values():
            a, b = pair["lora_A"], pair["lora_B"]
            name = next((n for n, (e, i, o) in shapes.items() if a.shape[1] == i and b.shape[0] == o
                         and a.shape[0] % e == 0 and a.shape[0] == b.shape[1]), None)
            if name is None:
                raise ValueError(f"{source}: LoRA factors {tuple(a.shape)}, {tuple(b.shape)} on {module} fit none of "
                                 f"its expert weights {shapes} (experts, in, out)")
            experts, in_features, out_features = shapes[name]
            r = a.shape[0] // experts
            ours[f"deltas.{module}.lora_A.{name}"] = a.reshape(experts, r, in_features)
            ours[f"deltas.{module}.lora_B.{name}"] = b.reshape(out_features, r, experts).permute(2, 0, 1).contiguous()
    return others, ours, sorted(pairs)


def write(delta: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The expert factors of ``delta`` in PEFT's names and layout, and its ``target_parameters``."""
    tensors, targets = {}, []
    for position, layer in delta.deltas.items():
        if not isinstance(layer, LoraExpertsLayer):
            continue
        for index, name in enumerate(layer.names):  # the module's parameter order: the first is innermost
            nesting = NESTED * (len(layer.names) - 1 - index)
            a, b = layer.lora_A[name], layer.lora_B[name]  # (E, r, in), (E, out, r)
            tensors[f"{prefix}{position}.{nesting}lora_A.weight"] = a.detach().reshape(-1, a.shape[-1])
            tensors[f"{prefix}{position}.{nesting}lora_B.weight"] = b.detach().permute(1, 2, 0).reshape(b.shape[1], -1)
            targets.append(f"{position}.{name}")
    return tensors, targets
