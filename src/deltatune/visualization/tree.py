"""A model's module tree, folded: identical repeated siblings become one node with a range, same-shaped siblings
one node with their names joined, so a 30-layer model reads in a screenful.

Two siblings fold when their *signatures* are equal: class, own parameters (name, shape, dtype, trainable), the
deltas attached to them, and, recursively, their children's names and signatures.  A folded node keeps the full
names of every module it stands for, so ticking it in the selector ticks all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..addressing import DELTA_SLOT, addressable_names, match_names
from ..routing import DeltaSlot
from ..structures import common_names

CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)  # classes that only hold children: shown as a path


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    state: str  # "trainable", "frozen" or "delta"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "state": self.state}


@dataclass(frozen=True)
class Delta:
    name: str
    kind: str
    route: str
    params: tuple[Param, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "route": self.route, "params": [p.to_dict() for p in self.params]}


@dataclass
class Node:
    label: str  # "layer.0-11", "query,key,value", "attention"
    kind: str  # class name
    names: list[str]  # full names of every module the node stands for
    params: list[Param]  # of one of them
    deltas: list[Delta]
    members: list[tuple[str, list[str]]] = field(default_factory=list)  # merged siblings: (local name, their names)
    children: list[Node] = field(default_factory=list)
    common: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "kind": self.kind, "names": self.names, "common": self.common,
            "params": [p.to_dict() for p in self.params], "deltas": [d.to_dict() for d in self.deltas],
            "members": [{"label": label, "names": names} for label, names in self.members],
            "children": [c.to_dict() for c in self.children],
        }

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def _params(module: nn.Module, state: str | None = None) -> tuple[Param, ...]:
    return tuple(Param(n, tuple(p.shape), state or ("trainable" if p.requires_grad else "frozen"))
                 for n, p in module.named_parameters(recurse=False))


def _deltas(module: nn.Module) -> tuple[Delta, ...]:
    slot = module._modules.get(DELTA_SLOT)
    if not isinstance(slot, DeltaSlot):
        return ()
    return tuple(Delta(name, type(delta).__name__, slot._routes[name][0].value,
                       tuple(Param(n, tuple(p.shape), "delta") for n, p in delta.named_parameters()))
                 for name, delta in slot.items())


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_children() if not (n == DELTA_SLOT and isinstance(m, DeltaSlot))]


class _Signatures:
    def __init__(self) -> None:
        self._memo: dict[int, tuple] = {}

    def __call__(self, module: nn.Module) -> tuple:
        key = id(module)
        if key not in self._memo:
            self._memo[key] = (type(module).__qualname__, _params(module), _deltas(module),
                               tuple((n, self(m)) for n, m in _children(module)))
        return self._memo[key]


def _range_label(names: list[str]) -> str:
    """``["0", "1", "2", "5"]`` -> ``"0-2,5"``; other names joined with commas."""
    if len(names) < 2 or not all(n.isdigit() for n in names):
        return ",".join(names)
    numbers, runs = sorted(int(n) for n in names), []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def build_tree(model: nn.Module, common: dict[str, list[str]] | None = None) -> Node:
    """The folded tree of ``model``; ``common`` maps full module names to their common names."""
    signature = _Signatures()
    common = common or {}

    def node(label: str, group: list[tuple[str, nn.Module]]) -> Node:
        first = group[0][1]
        names = [name for name, _ in group]
        result = Node(label, type(first).__name__, names, list(_params(first)), list(_deltas(first)),
                      common=list(dict.fromkeys(c for name in names for c in common.get(name, []))))
        # Children in order of first appearance, grouped by signature; each position collects every member's child.
        groups: dict[tuple, list[str]] = {}
        for child_name, child in _children(first):
            groups.setdefault(signature(child), []).append(child_name)
        for local_names in groups.values():
            members = [[(_join(name, c), module.get_submodule(c)) for name, module in group] for c in local_names]
            child = node(_range_label(local_names), [pair for column in members for pair in column])
            if len(local_names) > 1 and not all(c.isdigit() for c in local_names):
                child.members = [(c, [name for name, _ in column]) for c, column in zip(local_names, members)]
            result.children.append(child)
        if isinstance(first, CONTAINERS) and not result.params and len(result.children) == 1 and not result.deltas:
            only = result.children[0]  # "layer" holding "0-11": one node "layer.0-11 (BertLayer)"
            only.label = f"{label}.{only.label}" if label else only.label
            return only
        return result

    return node("", [("", model)])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def common_name_map(model: nn.Module) -> dict[str, list[str]]:
    """Full module name -> the common names (q, v, ffn_out, …) AutoDelta gives it; empty when none apply."""
    try:
        _, specs = common_names(model)
    except ValueError:
        return {}
    names, mapping = addressable_names(model), {}
    for common, entries in specs.items():
        for entry in entries:
            if isinstance(entry, (list, tuple)):  # pair forms name two modules; not a name of one
                continue
            try:
                hits = match_names(names, [entry])[entry]
            except ValueError:
                continue
            for hit in hits:
                mapping.setdefault(hit, []).append(common)
    return mapping
