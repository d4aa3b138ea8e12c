"""Threads: forward passes may run in several threads at once; changing deltas under one of them may not.

Attaching, detaching, merging or unmerging while another thread is inside the backbone's forward pass would give
that pass half a change (some modules with the delta, some without).  While a delta's hooks are on a backbone, two
more hooks on the backbone's own call count the passes running in each thread: a change raises if another thread
is inside one, and a pass that starts during a change waits for it to finish.  A merged-only model has no hooks at
all (bare-model speed), so a change under it is not caught; nor is one between two steps of a ``generate()`` running
in another thread, which is many passes.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _Guard:
    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.running: Counter[int] = Counter()  # forward passes in progress, by thread
        self.changer: int | None = None
        self.handles: list = []

    def enter(self) -> None:
        me = threading.get_ident()
        with self.condition:
            self.condition.wait_for(lambda: self.changer in (None, me))
            self.running[me] += 1

    def leave(self) -> None:
        me = threading.get_ident()
        with self.condition:
            self.running[me] -= 1
            if self.running[me] <= 0:
                del self.running[me]


_GUARDS: weakref.WeakKeyDictionary[nn.Module, _Guard] = weakref.WeakKeyDictionary()


# Module-level functions, found by the module they run on: a deep copy of the model keeps them harmlessly.
def _enter(module: nn.Module, args: tuple) -> None:
    guard = _GUARDS.get(module)
    if guard is not None and not torch.compiler.is_compiling():
        guard.enter()


def _leave(module: nn.Module, args: tuple, output) -> None:
    guard = _GUARDS.get(module)
    if guard is not None and not torch.compiler.is_compiling():
        guard.leave()


@contextmanager
def changing(model: nn.Module, what: str) -> Iterator[None]:
    """Hold ``model`` for one change: refused while another thread runs its forward pass or changes it.

    When the outermost change ends, compiled graphs are dropped, and Dynamo is told to guard on module hooks from
    then on. By default torch.compile does not guard on them, so a compiled graph would keep running the old deltas,
    and a graph traced on one model would run for another model of the same architecture whatever its deltas (a
    bare model and a copy with a LoRA, compiled side by side, gave the copy the bare model's outputs). Dropping the
    graphs costs about 10 µs when there are none, once per change rather than once per modified module; a compiled
    model recompiles on its next call."""
    guard = _GUARDS.setdefault(model, _Guard())
    me = threading.get_ident()
    with guard.condition:
        if guard.changer not in (None, me) or any(thread != me for thread in guard.running):
            raise RuntimeError(f"cannot {what} while another thread runs this model's forward pass or changes its "
                               "deltas; wait for it to finish")
        outer, guard.changer = guard.changer, me
    try:
        yield
    finally:
        if outer is None:
            _guard_compiled_graphs_on_hooks()
        with guard.condition:
            guard.changer = outer
            guard.condition.notify_all()


def _guard_compiled_graphs_on_hooks() -> None:
    import torch._dynamo  # loaded by torch.compiler.reset() anyway; not at import, to keep the import light

    torch._dynamo.config.skip_nnmodule_hook_guards = False  # process-wide, and only ever stricter
    torch.compiler.reset()


def watch(model: nn.Module, on: bool) -> None:
    """Count the model's forward passes (``on``: some delta hooks it), or leave it without these hooks."""
    guard = _GUARDS.setdefault(model, _Guard())
    if on and not guard.handles:
        guard.handles = [model.register_forward_pre_hook(_enter),
                         model.register_forward_hook(_leave, always_call=True)]
    elif not on:
        for handle in guard.handles:
            handle.remove()
        guard.handles = []
