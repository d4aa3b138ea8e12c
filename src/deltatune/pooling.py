"""How a sequence classifier pools its tokens: the model's own head, or the mean its checkpoint was trained with.

Sentence encoders (sentence-transformers checkpoints such as all-MiniLM-L6-v2) are trained to pool by the masked
mean of their last hidden states

    h = Σ_t m_t h_t / Σ_t m_t,        m: the attention mask,

and declare it in ``modules.json`` / ``1_Pooling/config.json``.  transformers' BERT classifier instead reads the
pooler, ``tanh(W h_[CLS] + b)``, which such a checkpoint never trained (all-MiniLM-L6-v2's pooler has a zero bias
and small random weights).  A frozen backbone cannot repair that: on Rotten Tomatoes a head alone on MiniLM-L6
reaches 65.6% through the pooler and 79.4% on the mean (docs/study.md).  ``mean`` replaces the pooler by the
masked mean; the classifier then reads ``h`` directly.

The choice is part of the backbone: a run folder records it, every command that rebuilds the backbone from a run
folder applies it (:func:`deltatune.loading.load_backbone`), and a saved delta's fingerprint carries it, so a delta
trained on the mean is refused on a model that pools ``[CLS]`` (and the other way round).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from torch import nn

CHOICES = ("auto", "model", "mean")  # auto: the mean when the checkpoint declares it, else the model's own head


class MeanPooler(nn.Module):
    """Stands in for a BERT-style ``pooler``: the masked mean of the hidden states.  The mask is the one the base
    model was called with (so a soft prompt's extended mask counts its tokens, and a prefix's cached positions,
    which are no hidden states, do not count), handed over by :func:`_keep_mask` for each thread's call apart, so
    concurrent forwards on one model each read their own."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[int, torch.Tensor | None] = {}  # thread id -> the mask of that thread's call in progress

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._take_mask()
        if mask is None:
            return hidden_states.mean(1)
        tokens = hidden_states.shape[1]
        if mask.dim() == 2 and mask.shape[1] > tokens:
            # A mask that also covers a KV cache (a prefix's virtual tokens) ends with the tokens' columns; the
            # cached positions are no hidden states, so they are not averaged.
            mask = mask[:, -tokens:]
        if mask.shape != hidden_states.shape[:2]:
            raise ValueError(f"mean pooling got an attention mask of shape {tuple(mask.shape)} for hidden states of "
                             f"{tuple(hidden_states.shape[:2])} (batch, tokens)")
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)

    @torch.compiler.disable  # a compiled graph would bake in one thread's id
    def _take_mask(self) -> torch.Tensor | None:
        return self.masks.pop(threading.get_ident(), None)

    @torch.compiler.disable
    def keep(self, mask: torch.Tensor | None) -> None:
        self.masks[threading.get_ident()] = mask


def _keep_mask(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """The base model's pre-hook: hands the call's attention mask to the base model's own pooler (a module-level
    function reading its module, so a deep copy of the model feeds its copy of the pooler)."""
    pooler = base.pooler
    if isinstance(pooler, MeanPooler):
        pooler.keep(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))


def declared(path: str | Path) -> str | None:
    """The pooling a sentence-transformers folder declares ("mean", "cls", "max", ...), or None for another model."""
    folder = Path(path)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text())
            modes = [key[len("pooling_mode_"):].removesuffix("_token").removesuffix("_tokens")
                     for key, on in config.items() if key.startswith("pooling_mode_") and on]
            return "+".join(modes) or None
    return None


def resolve(choice: str, path: str | Path) -> str:
    """``auto`` becomes ``mean`` for a checkpoint that declares mean pooling, else ``model``."""
    if choice not in CHOICES:
        raise ValueError(f"unknown pooling {choice!r}; choose {', '.join(CHOICES)}")
    if choice == "auto":
        return "mean" if declared(path) == "mean" else "model"
    return choice


def of(model: nn.Module) -> str:
    """``mean`` if the model's pooler was replaced by :func:`use_mean`, else ``model``."""
    return "mean" if any(isinstance(m, MeanPooler) for m in model.modules()) else "model"


def use_mean(model: nn.Module) -> nn.Module:
    """Replace the pooler of a BERT-style sequence classifier by the masked mean (in place; returns ``model``).
    Refused when the classifier does not read a pooler of its base model (RoBERTa's head reads ``<s>``'s state, a
    decoder's the last token's): the base model must have one, and the logits must move with it."""
    base = getattr(model, "base_model", None)
    if base is None or base is model or not isinstance(getattr(base, "pooler", None), nn.Module):
        raise ValueError(f"mean pooling replaces the pooler of a sequence classifier's base model; "
                         f"{type(model).__name__} has none. Use pooling 'model'")
    original, pooler = base.pooler, MeanPooler()
    base.pooler = pooler
    hook = base.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    if all(p.numel() and p.device.type != "meta" for p in model.parameters()):  # not yet when loaded partitioned
        try:
            _check_read(model, pooler)
        except Exception:
            base.pooler = original  # refused or failed: the model is left as it was
            hook.remove()
            raise
    return model


def _check_read(model: nn.Module, pooler: MeanPooler) -> None:
    """The logits must move when the pooled vector does: else the head reads something else and the mean would be
    computed for nothing."""
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        doubled = pooler.register_forward_hook(lambda module, args, output: output * 2)
        try:
            moved = model(input_ids=ids).logits
        finally:
            doubled.remove()
    if torch.equal(plain, moved):
        raise ValueError(f"mean pooling: the head of {type(model).__name__} does not read its base model's pooler. "
                         "Use pooling 'model'")
