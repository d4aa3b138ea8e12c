"""Runtime initialization: what flows through each target module, from its weights or from one pseudo forward pass.

A linear layer (``nn.Linear``, ``Conv1D``) or an embedding states its shapes in its floating-point weight: its
record is read from there, without running the model.  Shapes no weight states (an adapter's hidden size after an
arbitrary module, say) are read off a real forward pass, done eagerly when the delta is built, so every parameter
exists before the user makes an optimizer.  The pass runs in eval mode under ``torch.no_grad()``, restores each
module's training flag afterwards, and stops as soon as every position it needs has been seen.  Its input is
``pseudo_input``, else built from the model's config (:mod:`deltatune.pseudo_input`).

Default positions (common names) are also checked by a pass: modules the model never calls on its pseudo input
are left out, so a default never builds a delta that cannot act.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .pseudo_input import pseudo_inputs


@dataclass(frozen=True)
class Seen:
    """The first input and the first output tensor of a module during the probe."""

    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return self.output_shape[-1]


def from_weights(module: nn.Module) -> Seen | None:
    """The record of a linear layer or an embedding (``(features,)`` shapes: only the feature axis is known)."""
    from .compat import Conv1D
    from .sharding import full_shape

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or len(full_shape(weight)) != 2:
        return None
    if isinstance(module, (Conv1D, nn.Embedding)):
        features_in, features_out = full_shape(weight)
    elif isinstance(module, nn.Linear):
        features_out, features_in = full_shape(weight)
    else:
        return None
    input_shape = None if isinstance(module, nn.Embedding) else (features_in,)
    return Seen(input_shape, (features_out,), weight.dtype, weight.device)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients for a pass that only measures; every module's training flag is restored."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "values") and not isinstance(value, dict):  # ModelOutput
        value = tuple(value.values())
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def keyword_inputs(model: nn.Module, pseudo_input: Any = None) -> dict[str, Any]:
    """Keyword inputs for a call that measures something (the user's dict, else the model's pseudo inputs),
    without labels: the prompt methods' checks call the model with their own arguments added."""
    inputs = pseudo_input if isinstance(pseudo_input, dict) else pseudo_inputs(model)
    return {k: v for k, v in inputs.items() if k != "labels"}


def _call(model: nn.Module, pseudo_input: Any) -> None:
    if isinstance(pseudo_input, dict):
        model(**pseudo_input)
    elif isinstance(pseudo_input, (tuple, list)):
        model(*pseudo_input)
    else:
        model(pseudo_input)


class _AllSeen(Exception):
    """Raised by the last position's hook: the rest of the forward pass (an LM head, say) is not needed."""


def reached(model: nn.Module, positions: list[str], pseudo_input: Any = None) -> set[str] | None:
    """The modules among ``positions`` that a forward pass on the pseudo input can call: all but those under a
    module the pass skips (a causal-LM variant of an encoder-decoder never calls its cross-attention, say).  MoE
    experts the router happened not to pick stay: they sit in a list or dict the model indexes.  None when no
    pseudo input can be built."""
    if pseudo_input is None:
        try:
            pseudo_input = pseudo_inputs(model)
        except ValueError:
            return None
    modules = dict(model.named_modules())
    called: set[str] = {""}

    def recorder(name: str):
        def hook(module, args):
            called.add(name)

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in modules.items() if name]
    try:
        with evaluating(model):
            _call(model, pseudo_input)
    except Exception as error:
        raise RuntimeError(f"the forward pass of {type(model).__name__} that finds the modules its default "
                           f"positions reach failed: {type(error).__name__}: {error}. Pass pseudo_input=... with "
                           "inputs the model accepts, or modified_modules.") from error
    finally:
        for handle in handles:
            handle.remove()

    def can_run(name: str) -> bool:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # up to the nearest called ancestor
            if ".".join(parts[:depth]) in called:
                # its child on the way down was never called: a skipped module, unless one of a list or dict
                skipped, holder = modules[".".join(parts[:depth + 1])], modules[".".join(parts[:depth])]
                return name in called or any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) for m in (skipped, holder))
        return False

    return {p for p in positions if can_run(p)}


def probe(model: nn.Module, positions: list[str], pseudo_input: Any = None) -> dict[str, Seen]:
    """What each module in ``positions`` receives and produces: from its weights where they say it, else from one
    pseudo forward pass that stops as soon as every remaining position has been seen."""
    modules = dict(model.named_modules())
    seen: dict[str, Seen] = {p: s for p in positions if p and (s := from_weights(modules[p])) is not None}
    wanted = set(positions) - set(seen)
    if not wanted:
        return seen

    def recorder(name: str):
        def hook(module, args, kwargs, output):
            if name in seen:  # a module called twice (shared layers) keeps its first record
                return
            out = first_tensor(output)
            if out is None:
                return
            x = first_tensor(args) if args else first_tensor(tuple(kwargs.values()))
            shape = tuple(x.shape) if x is not None else None
            seen[name] = Seen(shape, tuple(out.shape), out.dtype, out.device)
            if wanted <= seen.keys():
                raise _AllSeen

        return hook

    inputs = pseudo_inputs(model) if pseudo_input is None else pseudo_input
    handles = [modules[name].register_forward_hook(recorder(name), with_kwargs=True) for name in wanted]
    try:
        with evaluating(model):
            _call(model, inputs)
    except _AllSeen:
        pass
    except Exception as error:
        raise RuntimeError(
            f"the probe forward pass of {type(model).__name__} failed: {type(error).__name__}: {error}. "
            "Pass pseudo_input=... with inputs the model accepts."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in positions if name not in seen]
    if missing:
        raise RuntimeError(
            f"these modules did not produce a tensor during the probe forward pass: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. They may be unused by forward(), or return no tensor; "
            "choose other modified_modules or pass a pseudo_input that reaches them."
        )
    return seen
