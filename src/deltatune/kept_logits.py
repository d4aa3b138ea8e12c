"""A causal language model's logits at chosen positions only, computed without the others.

A label word is scored at a few positions per row, and a prefill needs the logits of each row's last position, but
the model's head maps every position's hidden state to the whole vocabulary: on SmolLM2-135M (49,152 tokens) that
product is about a fifth of a forward pass, and the softmax of a batch of 32 rows × 64 tokens reads 100 million
logits.  A forward pre-hook on the output embeddings keeps only the chosen hidden states before the head runs, so
the head and everything after it see ``(rows, k)`` positions.  The model is still called as a whole (through a
distributed wrapper, with its deltas), so nothing else changes.  transformers' ``logits_to_keep`` keeps the same
positions in every row, which right-padded rows of different lengths do not share, and not every model takes it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def logits_at(model: nn.Module, forward: Callable[[], torch.Tensor], columns: torch.Tensor,
              width: int) -> torch.Tensor:
    """``forward()``'s logits at ``columns``: ``(rows, k, vocabulary)`` for ``columns`` of ``(rows, k)`` indices
    into inputs ``width`` positions wide.  Positions a soft prompt adds before the text are skipped (they make the
    outputs longer than ``width``); ``forward`` runs ``model`` (or a wrapper of it) on those inputs."""
    def pick(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[0] != len(columns) or hidden.shape[1] < width:
            raise RuntimeError(f"{type(model).__name__}'s head read states of shape {tuple(hidden.shape)}; "
                               f"expected (rows={len(columns)}, at least {width} positions, features)")
        rows = torch.arange(len(columns), device=hidden.device)[:, None]
        return hidden[rows, columns.to(hidden.device) + hidden.shape[1] - width]

    head, calls = model.get_output_embeddings(), []

    def keep(module: nn.Module, args: tuple, kwargs: dict):
        calls.append(module)
        if args:
            return (pick(args[0]), *args[1:]), kwargs
        if len(kwargs) != 1:  # nn.Linear's one input, passed by name
            raise RuntimeError(f"{type(model).__name__} called its output embeddings with {sorted(kwargs)}; "
                               "expected the hidden states alone")
        (name, hidden), = kwargs.items()
        return args, {name: pick(hidden)}

    handle = head.register_forward_pre_hook(keep, with_kwargs=True) if head is not None else None
    try:
        logits = forward()
    finally:
        if handle is not None:
            handle.remove()
    if len(calls) > 1:
        raise RuntimeError(f"{type(model).__name__} called its output embeddings {len(calls)} times in one forward; "
                           "cannot tell which call gives the logits")
    return logits if calls else pick(logits)  # a model that bypasses its head module: pick from all the logits
