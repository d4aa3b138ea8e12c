"""Choose ``modified_modules`` by clicking: a local web page with the folded module tree.

:func:`select_modules` serves the page on 127.0.0.1 (never another interface) with a per-session token, prints
the URL (to stderr: stdout is left for results), and returns the ticked modules' full names when the user submits.  The page previews what a name or
``[r]regex`` matches (with the same addressing rules as ``modified_modules``) and the delta's parameter count for
the current selection, computed by building the delta without attaching it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from ..addressing import addressable_names, match_names
from ..visualization import Visualization
from .page import selector_html
from .server import SelectorServer

__all__ = ["SelectorServer", "select_modules"]


def _api(model: nn.Module, delta_type: str, hyperparameters: dict[str, Any], result: list[str]) -> dict:
    from ..auto import DELTA_TYPES

    names = addressable_names(model)
    known = set(names)

    def checked(request: dict) -> list[str]:
        modules = request["modules"]
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise TypeError("modules must be a list of module names")
        unknown = sorted(set(modules) - known)
        if unknown:
            raise ValueError(f"{type(model).__name__} has no module(s) {unknown[:5]}")
        chosen = set(modules)
        return [n for n in names if n in chosen]  # model order

    def match(request: dict) -> dict:
        return {"names": match_names(names, [str(request["spec"])], "selector")[str(request["spec"])]}

    def cost(request: dict) -> dict:
        positions = checked(request)
        if not positions:
            return {"positions": [], "parameters": 0}
        delta = DELTA_TYPES[delta_type](model, positions, attach=False, **hyperparameters)
        return {"positions": delta.positions, "parameters": delta.num_delta_parameters()}

    def submit(request: dict) -> dict:
        positions = checked(request)
        if not positions:
            raise ValueError("nothing selected: tick at least one module")
        result[:] = positions
        return {"modules": positions}

    return {"/api/match": match, "/api/cost": cost, "/api/submit": submit}


def select_modules(
    model: nn.Module,
    delta_type: str = "lora",
    *,
    port: int = 0,
    timeout: float = 600.0,
    announce: Callable[[str], Any] | None = None,
    **hyperparameters: Any,
) -> list[str]:
    """Serve the selector for ``model`` and wait for the user's Submit; return the chosen full module names.

    ``port`` 0 picks a free one.  The cost shown is that of ``delta_type`` with ``hyperparameters``.  Raises
    ``TimeoutError`` after ``timeout`` seconds without a submission; Ctrl-C stops the server and propagates.
    """
    from ..auto import DELTA_TYPES

    if delta_type not in DELTA_TYPES:
        raise ValueError(f"unknown delta type {delta_type!r}; known: {', '.join(sorted(DELTA_TYPES))}")
    data = {**Visualization(model).to_json(), "delta_type": delta_type}
    result: list[str] = []
    server = SelectorServer(lambda token: selector_html({**data, "token": token}),
                            _api(model, delta_type, hyperparameters, result), port).start()
    announce = announce or (lambda line: print(line, file=sys.stderr))  # stdout is for results
    announce(f"Choose the modules to modify at {server.url}  (Ctrl-C cancels; closes in {timeout:.0f} s)")
    try:
        if not server.finished.wait(timeout):
            raise TimeoutError(f"no selection was submitted within {timeout:.0f} s; the selector has stopped")
    finally:
        server.close()
    return result
