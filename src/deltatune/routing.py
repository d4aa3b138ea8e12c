"""Dynamic tensor re-routing: the one primitive every method uses to hook into a backbone module.

Three routes cover the methods (He et al. 2022), and a fourth the weights a module reads itself::

    input -> input    x <- m(x)        before the module runs      (prompts, prefixes)
                      or (args, kwargs) <- m(args, kwargs) for a delta with ``rewrites_call = True``
                      (positional inputs arrive as keyword arguments); such a delta may also have
                      ``finish(h) -> h``, run first after the module (to take back what it added); those
                      that fill the KV cache (``fills_cache = True``) run after the others
    input -> output   h <- m(x, h)     after, reading its input    (LoRA, parallel adapter, (IA)^3)
    output -> output  h <- m(h)        after, reading its output   (sequential adapter, BitFit, Compacter)
    weight            W <- W + ΔW      while the module runs       (LoRA on fused MoE expert weights)
                      ``swap_in(module)`` shadows the module's parameters by the updated weights (instance
                      attributes, so ``parameters()`` and ``state_dict()`` still hold the originals) and
                      ``swap_out(module)`` removes them after the call, also when it raised; calls on one module
                      from several threads take turns meanwhile

Each modified module gets one :class:`DeltaSlot`, a ``ModuleDict`` registered as its child ``deltas``, so delta
parameters are ordinary submodules of the backbone (``.to()``, ``parameters()``, ``state_dict()`` and optimizers
see them).  The slot owns at most one forward pre-hook and one forward hook on the module, and runs its deltas in a
fixed order, whatever order they were attached in: input->input rewrites, then the module, then input->output terms,
then output->output rewrites, each group in delta creation order.  So deltas compose, and detaching one leaves
exactly the computation of the others.  When the last delta leaves, the hooks are removed and the child deleted:
the module is back to its original state, bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from enum import Enum

import torch
from torch import nn

from .addressing import DELTA_SLOT


class Route(str, Enum):
    INPUT_INPUT = "input->input"
    INPUT_OUTPUT = "input->output"
    OUTPUT_OUTPUT = "output->output"
    WEIGHT = "weight"


@functools.lru_cache(maxsize=None)
def _positional_names(module_class: type[nn.Module]) -> tuple[str, ...]:
    # Cached per class: inspecting a signature costs more than attaching a delta.
    parameters = list(inspect.signature(module_class.forward).parameters.values())[1:]  # skip self
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _replace_first(output, hidden: torch.Tensor):
    """``output`` with its first element (the hidden state) replaced; tuples, lists and ModelOutputs."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    if hasattr(output, "keys"):  # transformers ModelOutput: the first non-None field is the hidden state
        output[next(iter(output.keys()))] = hidden
        return output
    raise TypeError(f"cannot re-route an output of type {type(output).__name__}; expected a tensor or a tuple")


class DeltaSlot(nn.ModuleDict):
    """The deltas attached to one backbone module, run by one pre-hook and one forward hook."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        positional = _positional_names(type(host))
        self.__dict__.update(_routes={}, _positional=positional, _first_input=positional[0] if positional else None,
                             _handles=[], _lock=threading.RLock())  # plain values: see _plan
        self._plan()

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.RLock()

    def forward(self, x, *args, **kwargs):
        # Hosts such as nn.Sequential call every child in turn: the slot, their last child, passes x through.
        return x

    def add(self, host: nn.Module, name: str, delta: nn.Module, route: Route, order: int) -> None:
        if name in self._routes:
            raise ValueError(f"a delta named {name!r} is already attached here; give the new delta another name")
        if not name.isidentifier() or hasattr(self, name):
            raise ValueError(f"{name!r} cannot name a delta: use an identifier that is not a ModuleDict attribute")
        if getattr(delta, "exclusive", False) and any(type(other) is type(delta) for other in self.values()):
            raise ValueError(f"a module takes one {type(delta).__name__}, and one is attached here already; detach "
                             "it first")
        self[name] = delta
        self._routes[name] = (route, order)
        self._plan()
        self._hook(host)

    def remove(self, host: nn.Module, name: str) -> nn.Module:
        delta = self[name]
        del self[name]
        del self._routes[name]
        self._plan()
        self._hook(host)
        return delta

    def _plan(self) -> None:
        ordered = sorted(self._routes.items(), key=lambda item: item[1][1])
        rewrites = [self[n] for n, (r, _) in ordered if r is Route.INPUT_INPUT]
        # Rewrites that fill the KV cache (prefixes) run after the others: a soft prompt that saw a filled cache
        # would take the call for a later generation step and leave its prompt out.
        call_rewrites = sorted((m for m in rewrites if getattr(m, "rewrites_call", False)),
                               key=lambda m: getattr(m, "fills_cache", False))
        # Plain lists, set past nn.Module.__setattr__ (whose checks cost more than the rest of attaching).
        self.__dict__.update(
            _call_rewrites=call_rewrites,
            _finishers=[m for m in reversed(call_rewrites) if hasattr(m, "finish")],
            _input_rewrites=[m for m in rewrites if not getattr(m, "rewrites_call", False)],
            _parallel=[self[n] for n, (r, _) in ordered if r is Route.INPUT_OUTPUT],
            _output_rewrites=[self[n] for n, (r, _) in ordered if r is Route.OUTPUT_OUTPUT],
            _weights=[self[n] for n, (r, _) in ordered if r is Route.WEIGHT])

    def _hook(self, host: nn.Module) -> None:
        # Re-register from scratch: at most one hook of each kind, only the kinds some delta needs.  (Compiled
        # graphs, which do not guard on hooks, are dropped once per change by threads.changing.)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._call_rewrites or self._input_rewrites or self._weights:
            self._handles.append(host.register_forward_pre_hook(self._before, with_kwargs=True))
        if self._finishers or self._parallel or self._output_rewrites:
            self._handles.append(host.register_forward_hook(self._after, with_kwargs=True))
        if self._weights:
            self._handles.append(host.register_forward_hook(self._restore, always_call=True))

    def _input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if args:
            return args[0]
        if self._first_input in kwargs:
            return kwargs[self._first_input]
        raise RuntimeError(f"the module was called without its first input {self._first_input!r}; cannot re-route it")

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._weights:
            self._lock.acquire()  # released by _restore, which torch runs also when the call (or this hook) raises
            for delta in self._weights:
                delta.swap_in(module)
        if self._call_rewrites:
            if args and len(args) <= len(self._positional):  # call rewrites see every input by name
                kwargs, args = {**kwargs, **dict(zip(self._positional, args))}, ()
            for delta in self._call_rewrites:
                args, kwargs = delta(args, kwargs)
        if not self._input_rewrites:
            return args, kwargs
        x = self._input(args, kwargs)
        for delta in self._input_rewrites:
            x = delta(x)
        if args:
            return (x, *args[1:]), kwargs
        kwargs[self._first_input] = x
        return args, kwargs

    def _restore(self, module: nn.Module, args: tuple, output) -> None:
        for delta in self._weights:
            delta.swap_out(module)
        self._lock.release()

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        plain = isinstance(output, torch.Tensor)
        hidden = output if plain else output[0]
        for delta in self._finishers:
            hidden = delta.finish(hidden)
        if self._parallel:
            x = self._input(args, kwargs)
            for delta in self._parallel:
                hidden = delta(x, hidden)
        for delta in self._output_rewrites:
            hidden = delta(hidden)
        return hidden if plain else _replace_first(output, hidden)


def _floating(module: nn.Module) -> torch.Tensor | None:
    own = itertools.chain(module._parameters.values(), module._buffers.values())  # usually enough, and fast
    everything = itertools.chain(own, module.parameters(), module.buffers())
    return next((t for t in everything if t is not None and t.is_floating_point()), None)


def _follow(delta: nn.Module, host: nn.Module) -> None:
    """A detached or merged delta belongs to no module, so ``model.to()`` / ``.double()`` passed it by: on its way
    (back) in it takes its host's device and floating-point dtype."""
    ours, theirs = _floating(delta), _floating(host)
    if ours is not None and theirs is not None and (ours.dtype, ours.device) != (theirs.dtype, theirs.device):
        delta.to(device=theirs.device, dtype=theirs.dtype)


def attach(host: nn.Module, name: str, delta: nn.Module, route: Route, order: int) -> None:
    """Route ``host``'s tensors through ``delta`` (registered as ``host.deltas[name]``), which takes the host's
    device and dtype if it has lost them."""
    _follow(delta, host)
    slot = host._modules.get(DELTA_SLOT)
    if slot is None:
        slot = DeltaSlot(host)
        host.add_module(DELTA_SLOT, slot)
    elif not isinstance(slot, DeltaSlot):
        raise ValueError(f"{type(host).__name__} already has a child named {DELTA_SLOT!r}; it cannot host deltas")
    try:
        slot.add(host, name, delta, route, order)
    except Exception:
        if not len(slot):  # a refused first delta leaves no empty slot behind
            del host._modules[DELTA_SLOT]
        raise


def detach(host: nn.Module, name: str) -> nn.Module:
    """Undo :func:`attach`; the last delta to leave removes the slot and its hooks."""
    slot = host._modules[DELTA_SLOT]
    delta = slot.remove(host, name)
    if not len(slot):
        del host._modules[DELTA_SLOT]
    return delta


def attached_names(host: nn.Module) -> list[str]:
    slot = host._modules.get(DELTA_SLOT)
    return list(slot.keys()) if isinstance(slot, DeltaSlot) else []
