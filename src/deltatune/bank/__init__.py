"""Many deltas on one backbone: each row of a batch runs with its own delta, or none, in one forward pass.

::

    bank = DeltaBank(model, {"spam": spam_delta, "trec": trec_delta})    # built with attach=False, or detached
    with bank.route(["spam", "trec", None, "spam"]):                      # one name (or None) per row
        logits = model(**batch).logits                                    # also model.generate(...)

At every module some delta of the bank modifies, the bank hangs one stack per delta type (:mod:`.stacks`,
:mod:`.prompts`): the weights of all its deltas of that type stacked along a new axis, which each row reads by one
gather (``bmm`` of gathered LoRA matrices, gathered (IA)³/BitFit vectors, adapter weights; soft prompts and
prefixes padded per row and masked).  The cost does not grow with the number of deltas, and there is no loop over
rows.  Each row computes what it computes alone with its delta attached, up to floating-point round-off.

The stacks are inference-time copies of the deltas' weights: ``route()`` refuses a model in training mode, and
rebuilds the stacks when a delta's tensors changed since (a checkpoint loaded into it, an optimizer step: PyTorch's
version counters; a write through ``tensor.data`` bypasses them, so call :meth:`refresh` after one).  Outside
``route()`` the bank changes nothing.  Deltas loaded with their classification heads kept apart
(``keep_backbone_apart=True``) give each row its own head (:mod:`.heads`).  Deltas of the bank stay detached:
attaching one would apply it to every row.  A batch whose rows all name one delta runs through that delta's own
modules.
Delta modules without a row form (the paired parallel adapter, prefixes of encoder-decoders and of attention
without a KV cache) are refused when added.  Calls to ``route()`` from several threads take turns.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .. import live, routing, threads
from ..base import DeltaBase, _creation
from .heads import HeadStack, check_heads, heads_of
from .prompts import SoftPromptStack, prompt_kind
from .stacks import Stack, stack_kind

_banks = itertools.count()


def _kind(layer: nn.Module) -> tuple[type[Stack], tuple] | None:
    return stack_kind(layer) or prompt_kind(layer)


def _check_one_prompt_place(groups: dict[tuple, list]) -> None:
    """Soft prompts inserted at different places cannot share a batch: each row's prompt would shift the others'
    tokens by its own length at another place."""
    places: dict[str, set] = {}
    for position, kind, *agreed in groups:
        if kind is SoftPromptStack:
            (insert_at,) = agreed[0]
            places.setdefault(position, set()).add(insert_at)
    for position, found in places.items():
        if len(found) > 1:
            raise ValueError(f"soft prompts inserted at different places (insert_at {sorted(found)}) cannot share a "
                             "mixed batch; put them in separate banks")


class DeltaBank:
    """Deltas built on one backbone, served together: see the module docstring."""

    def __init__(self, backbone_model: nn.Module,
                 deltas: Mapping[str, DeltaBase] | Iterable[DeltaBase] = ()) -> None:
        self.backbone_model = backbone_model
        self.name = f"bank{next(_banks)}"
        self.order = next(_creation)  # runs after deltas created before it, before those created after
        self._deltas: dict[str, DeltaBase] = {}
        self._stacks: list[tuple[str, nn.Module, Stack, dict[str, int]]] = []  # slot name, host, stack, lookup
        self._built_from: tuple | None = None  # the fingerprint at the last build (None: build at the next route)
        self._watched: list[tuple[dict, str]] = []
        self._lock = threading.RLock()
        items = deltas.items() if isinstance(deltas, Mapping) else ((d.name, d) for d in deltas)
        for name, delta in items:
            self.add(delta, name)

    # ------------------------------------------------------------------------------------------ membership
    @property
    def names(self) -> list[str]:
        return list(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __contains__(self, name: object) -> bool:
        return name in self._deltas

    def __getitem__(self, name: str) -> DeltaBase:
        return self._deltas[name]

    def add(self, delta: DeltaBase, name: str | None = None) -> None:
        """Serve ``delta`` under ``name`` (default: its own name); nothing changes if it is refused."""
        name = delta.name if name is None else name
        self.check(delta, name)
        self._deltas[name] = delta
        self._built_from = None

    def check(self, delta: DeltaBase, name: str) -> None:
        """Raise unless :meth:`add` would take ``delta`` as ``name``."""
        if not isinstance(delta, DeltaBase):
            raise TypeError(f"a bank holds deltatune deltas, not {type(delta).__name__}")
        if delta.backbone_model is not self.backbone_model:
            raise ValueError(f"delta {name!r} was built on another backbone than this bank's")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a delta in a bank needs a non-empty string name, not {name!r}")
        if name in self._deltas:
            raise ValueError(f"the bank already holds a delta named {name!r}; remove it first or choose another name")
        if any(existing is delta for existing in self._deltas.values()):
            raise ValueError(f"delta {delta.name!r} is in the bank already, under another name")
        self._check_detached(name, delta)
        missing = sorted({type(layer).__name__ for layer in delta.deltas.values() if _kind(layer) is None})
        if missing:
            raise TypeError(f"delta {name!r} ({type(delta).__name__}) has modules without a row form: "
                            f"{', '.join(missing)}; mixed batches support LoRA/DoRA, (IA)³, BitFit, sequential and "
                            "parallel adapters, Compacter, low-rank adapters, soft prompts and prefixes of "
                            "decoders and encoders with a KV cache")
        check_heads(name, delta, self.backbone_model)

    def remove(self, name: str) -> DeltaBase:
        """Stop serving ``name``; returns its delta (still detached)."""
        delta = self._deltas.pop(self._known(name))
        self._built_from = None
        return delta

    def refresh(self) -> None:
        """Rebuild the stacks at the next ``route()`` (needed only after writes through ``tensor.data``)."""
        self._built_from = None

    def close(self) -> None:
        """Take the bank's stacks off the backbone (they come back at the next ``route()``)."""
        with self._lock, threads.changing(self.backbone_model, "change a delta bank"):
            for slot_name, host, _, _ in self._stacks:
                routing.detach(host, slot_name)
            self._stacks, self._built_from = [], None
        threads.watch(self.backbone_model, live.any_hooked(self.backbone_model))

    # ------------------------------------------------------------------------------------------------ route
    @contextmanager
    def route(self, names: Sequence[str | None], repeat: int = 1) -> Iterator[None]:
        """Run row ``b`` of the batches inside this context with delta ``names[b]`` (None: the bare backbone).
        ``repeat``: rows per name, for ``generate()`` with ``num_beams`` (or ``num_return_sequences``) ``= repeat``,
        which runs each input row as that many consecutive rows."""
        if isinstance(names, str) or not isinstance(names, Sequence) or not len(names):
            raise TypeError(f"route() takes a non-empty list with one delta name (or None) per row, not {names!r}")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive integer (num_beams), got {repeat!r}")
        names = [name for name in names for _ in range(repeat)]
        for name in names:
            if name is not None:
                self._known(name)
        with self._lock:
            if self.backbone_model.training:
                raise RuntimeError("DeltaBank.route() is for inference: call model.eval() first (the bank holds "
                                   "copies of the deltas' weights, so training through it would not train them)")
            for name, delta in self._deltas.items():
                self._check_detached(name, delta)
            if self._built_from is None or self._built_from != self._fingerprint():
                self._build()
            self._check_heads_come_first()
            indices: dict[tuple, torch.Tensor] = {}
            try:
                for _, _, stack, lookup in self._stacks:
                    local = tuple(lookup.get(name, len(lookup)) for name in names)
                    distinct = set(local)
                    if distinct == {len(lookup)}:  # no row reads this stack: it passes through
                        stack.select(None)
                        continue
                    device = stack.device
                    if (local, device) not in indices:
                        indices[local, device] = torch.tensor(local, device=device)
                    stack.select(indices[local, device], local[0] if len(distinct) == 1 else None)
                yield
            finally:
                for _, _, stack, _ in self._stacks:
                    stack.select(None)

    # ------------------------------------------------------------------------------------------ internals
    def _known(self, name: str) -> str:
        if name not in self._deltas:
            raise KeyError(f"the bank holds no delta named {name!r}; it holds: {', '.join(self._deltas) or 'none'}")
        return name

    @staticmethod
    def _check_detached(name: str, delta: DeltaBase) -> None:
        if delta.attached or delta.merged:
            raise RuntimeError(f"delta {name!r} is {'merged' if delta.merged else 'attached'}, so it would apply to "
                               "every row; detach it (or build it with attach=False) to serve it from a bank")

    def _head_hosts(self) -> dict[str, nn.Module]:
        positions = dict.fromkeys(p for delta in self._deltas.values() for p in heads_of(delta))
        return {position: self.backbone_model.get_submodule(position) for position in positions}

    def _check_heads_come_first(self) -> None:
        ours = {slot_name for slot_name, *_ in self._stacks}
        for position, host in self._head_hosts().items():
            others = [n for n in routing.attached_names(host) if n not in ours]
            if others:
                raise RuntimeError(f"{position} serves the deltas' own heads, which replace its output, but "
                                   f"{', '.join(others)} is attached to it as well; detach it to use the bank")

    def _fingerprint(self) -> tuple:
        """Identity, storage and version of every tensor the stacks copied: the deltas' parameters, their heads and
        the backbone's own heads (for rows without one).  Parameters are read from their modules' own tables,
        listed at the last build (walking the modules costs more than a forward pass at batch 1)."""
        tensors = [owner.get(key) for owner, key in self._watched]
        tensors += [t for delta in self._deltas.values() for t in delta.backbone_apart.values()]
        return tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in tensors)

    def _watch(self) -> list[tuple[dict, str]]:
        modules = [m for delta in self._deltas.values() for layer in delta.deltas.values() for m in layer.modules()]
        modules += list(self._head_hosts().values())
        return [(m._parameters, key) for m in modules for key, t in m._parameters.items() if t is not None]

    def _build(self) -> None:
        groups: dict[tuple, list[tuple[str, object]]] = {}
        hosts = self._head_hosts()
        for name, delta in self._deltas.items():  # heads first: they replace their module's output
            for position, entry in heads_of(delta).items():
                groups.setdefault((position, HeadStack), []).append((name, entry))
        for name, delta in self._deltas.items():
            for position, layer in delta.deltas.items():
                hosts[position] = delta._hosts[position]
                groups.setdefault((position, *_kind(layer)), []).append((name, layer))
        _check_one_prompt_place(groups)
        stacks = []
        for (position, kind, *_), members in groups.items():
            stack = kind([member for _, member in members], hosts[position])
            stacks.append((position, stack, {name: k for k, (name, _) in enumerate(members)}))
        with threads.changing(self.backbone_model, "change a delta bank"):
            for slot_name, host, _, _ in self._stacks:
                routing.detach(host, slot_name)
            self._stacks = []
            counts: dict[str, int] = {}
            try:
                for position, stack, lookup in stacks:
                    counts[position] = counts.get(position, -1) + 1
                    slot_name = f"{self.name}_{counts[position]}"
                    routing.attach(hosts[position], slot_name, stack, stack.route, self.order)
                    self._stacks.append((slot_name, hosts[position], stack, lookup))
            except Exception:
                for slot_name, host, _, _ in self._stacks:
                    routing.detach(host, slot_name)
                self._stacks = []
                raise
        threads.watch(self.backbone_model, True)
        self._watched = self._watch()
        self._built_from = self._fingerprint()
