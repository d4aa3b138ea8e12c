"""Continuous batching: requests join a running generation at its next step and leave it when they are done.

Each step feeds every running row its last token in one forward pass over the shared KV cache, inside
``bank.route()`` of the rows' deltas.  Requests that arrive meanwhile are prefilled together (left-padded) and
merged in: their keys and values are left-padded with masked zeros to the running length (or the running ones to
theirs) and stacked on the batch axis.  A finished row leaves at once: its cache rows are dropped, and columns that
only padding fills any more are cut off.  Each row's positions count its own tokens, so a row computes what it
computes alone, up to round-off (the padding is masked).

Only deltas that act on weights and activations can join (LoRA, adapters, (IA)³, BitFit, ...).  Soft prompts and
prefixes add positions to a row and fill its cache when its prompt runs, which this loop does not track; the engine
refuses their requests.  The model's cache must be the growing kind (``DynamicCache`` of full-attention layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .. import compat
from ..bank import DeltaBank
from ..kept_logits import logits_at

# generate() settings this loop does not apply: a generation config that sets any of them is refused.
_UNSUPPORTED = {"num_beams": 1, "penalty_alpha": None, "guidance_scale": None, "repetition_penalty": 1.0,
                "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
                "exponential_decay_length_penalty": None, "renormalize_logits": False, "min_p": None, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def check_model(model: nn.Module) -> None:
    """Raise unless ``model`` generates as this loop does: a growing KV cache, no extra logits processing."""
    config = model.generation_config
    changed = [name for name, default in _UNSUPPORTED.items() if getattr(config, name, None) not in (default, None, [])]
    if changed:
        raise ValueError(f"continuous batching samples with temperature, top-k and top-p only, but this model's "
                         f"generation config also sets {', '.join(changed)}; serve it without --continuous")
    argument = compat.cache_argument(model)
    if argument is None:
        raise ValueError(f"{type(model).__name__} takes no KV cache; continuous batching needs one")
    cache = compat.new_cache()
    with torch.no_grad():
        model(torch.ones(1, 2, dtype=torch.long, device=next(model.parameters()).device), use_cache=True,
              **{argument: cache})
    try:
        compat.cache_tensors(cache)
    except compat.CompatibilityError as error:
        raise ValueError(f"continuous batching merges and splits KV caches by rows: {error}") from None


def choose(logits: torch.Tensor, sampling: list[tuple], top_k: int | None) -> torch.Tensor:
    """The next token of each row: the most likely for greedy rows (``(False,)``), else sampled as generate()
    samples (temperature, then top-k, then top-p)."""
    tokens = logits.argmax(-1)
    for setting in set(sampling) - {(False,)}:
        _, temperature, top_p = setting
        rows = torch.tensor([s == setting for s in sampling], device=logits.device).nonzero().squeeze(1)
        scores = TemperatureLogitsWarper(temperature)(None, logits[rows].float())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        tokens[rows] = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
    return tokens


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1 - dim) + (missing, 0))


class RunningBatch:
    """The rows being generated: their deltas, attention mask, KV cache and last tokens."""

    def __init__(self, model: nn.Module, bank: DeltaBank, pad: int) -> None:
        self.model, self.bank, self.pad = model, bank, pad
        self.argument = compat.cache_argument(model)
        self.top_k = compat.generation_setting(model.generation_config, "top_k")
        self._empty()

    def _empty(self) -> None:
        self.rows: list = []  # whatever the caller tracks per row, in batch order
        self.deltas: list[str | None] = []
        self.sampling: list[tuple] = []
        self.mask = self.cache = self.last = None

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, deltas: list[str | None]) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        last = torch.full((len(ids), 1), ids.shape[1] - 1)  # rows are left-padded: each ends in the last column
        forward = lambda: self.model(input_ids=ids, attention_mask=mask, position_ids=positions,  # noqa: E731
                                     use_cache=True, **{self.argument: cache}).logits
        with torch.no_grad(), self.bank.route(deltas):
            if ids.shape[1] == 1:  # a decode step: one position already, nothing to keep
                return forward()[:, -1]
            return logits_at(self.model, forward, last, ids.shape[1])[:, 0]  # a prefill's head runs on one position

    def join(self, rows: list, prompts: list[list[int]], deltas: list[str | None], sampling: list[tuple]
             ) -> torch.Tensor:
        """Prefill new rows and merge them in; their first tokens (in the order given)."""
        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt):], mask[b, width - len(prompt):] = torch.tensor(prompt), 1
        cache = compat.new_cache()
        first = choose(self._forward(ids, mask, cache, deltas), sampling, self.top_k)
        if self.rows:
            length = max(self.mask.shape[1], width)
            merged = compat.new_cache()
            for index, (old, new) in enumerate(zip(compat.cache_tensors(self.cache), compat.cache_tensors(cache))):
                keys, values = (torch.cat([_left_pad(o, length, 2), _left_pad(n, length, 2)]) for o, n in zip(old, new))
                compat.fill_cache(merged, index, keys, values)
            cache = merged
            mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            first_last = torch.cat([self.last, first])
        else:
            first_last = first
        self.rows += rows
        self.deltas += deltas
        self.sampling += sampling
        self.cache, self.mask, self.last = cache, mask, first_last
        return first

    def step(self) -> torch.Tensor:
        """One token for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        logits = self._forward(self.last[:, None], self.mask, self.cache, self.deltas)
        self.last = choose(logits, self.sampling, self.top_k)
        return self.last

    def keep(self, done: Callable[[object], bool]) -> None:
        """Drop the rows ``done`` says are finished, and the cache columns that only padding fills then."""
        kept = [b for b, row in enumerate(self.rows) if not done(row)]
        if len(kept) == len(self):
            return
        if not kept:
            self._empty()
            return
        index = torch.tensor(kept, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.cumsum(-1) == 0).sum(-1).min())  # leading columns that every kept row pads
        trimmed = compat.new_cache()
        for number, (keys, values) in enumerate(compat.cache_tensors(self.cache)):
            compat.fill_cache(trimmed, number, keys[index, :, start:], values[index, :, start:])
        self.cache, self.mask, self.last = trimmed, mask[:, start:], self.last[index]
        self.rows = [self.rows[b] for b in kept]
        self.deltas = [self.deltas[b] for b in kept]
        self.sampling = [self.sampling[b] for b in kept]
