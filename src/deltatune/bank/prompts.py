"""Row forms of soft prompts and prefixes: each row of a batch gets its own delta's prompt or prefix, of its own
length ``n_b`` (0 for a row without one), in a block of ``N = max n_b`` positions::

    block_b = [pad × (N - n_b), P_b]        mask [0 × (N - n_b), 1 × n_b]

so every row computes what it computes alone: masked positions are not attended to, and positions are shifted by
the row's own ``n_b`` — explicit ``position_ids`` by ``n_b``, and when the call passes none while the lengths
differ, ``position_ids`` are made as the model would make them for the row alone (that needs an unpadded batch;
``generate()`` always passes positions).  A soft prompt's block goes where the delta inserts its prompt (first, or
after ``[CLS]``); a prefix's block fills the KV cache before any token.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import compat
from ..methods.positions import check_room
from ..methods.prefix import Prefix
from ..methods.soft_prompt import EncoderMaskExtension, SoftPrompt, _insert
from ..probe import evaluating, first_tensor, keyword_inputs
from ..routing import Route
from .stacks import Stack


def right_aligned(pieces: list[torch.Tensor], axis: int) -> torch.Tensor:
    """``pieces`` of different lengths along ``axis``, stacked on a new first axis with zeros on their left, plus
    one entry of zeros (the rows without a prompt)."""
    width = max(piece.shape[axis] for piece in pieces)
    shape = list(pieces[0].shape)
    shape[axis] = width
    stacked = pieces[0].new_zeros(len(pieces) + 1, *shape)
    for k, piece in enumerate(pieces):
        stacked[k].narrow(axis, width - piece.shape[axis], piece.shape[axis]).copy_(piece)
    return stacked


def positions_ignore_padding(host: nn.Module) -> bool:
    """Whether ``host`` numbers its tokens 0, 1, 2, ... whatever the mask (LLaMA, GPT-2, BERT) rather than
    counting the tokens the mask keeps (OPT): asked of the model, with a left-padded pseudo input."""
    inputs = keyword_inputs(host)
    ids = inputs.pop("input_ids", None)
    if ids is None or ids.shape[1] < 2:
        return False
    inputs.pop("position_ids", None)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    with evaluating(host):
        by_default = first_tensor(host(input_ids=ids, **{**inputs, "attention_mask": mask}))
        numbered = first_tensor(host(input_ids=ids, **{**inputs, "attention_mask": mask}, position_ids=positions))
    return torch.allclose(by_default, numbered, rtol=0, atol=0, equal_nan=True)


def padding_is_invisible(host: nn.Module) -> bool:
    """Whether ``host``, which takes no ``position_ids``, computes for tokens after masked left padding what it
    computes without the padding (relative positions: T5) rather than counting the padding as positions (BART):
    asked of the model, with a pseudo input and the same input after one masked token."""
    inputs = keyword_inputs(host)
    ids = inputs.pop("input_ids", None)
    if ids is None or ids.shape[1] < 2:
        return False
    inputs.pop("attention_mask", None)
    if any(k in inputs for k in ("token_type_ids", "inputs_embeds")):
        return False  # more per-token inputs than this check shifts
    mask = torch.ones_like(ids)
    with evaluating(host):
        alone = first_tensor(host(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], **inputs))
        mask[:, 0] = 0
        padded = first_tensor(host(input_ids=ids, attention_mask=mask, **inputs))
    if padded.shape[1:] != alone.shape[1:]:  # outputs per input token: the padded row's come after its pad
        padded = padded[:, 1:]
    return padded.shape == alone.shape and torch.allclose(padded, alone, rtol=1e-4, atol=1e-5)


_PADDING_CHECKS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def rows_may_differ(host: nn.Module) -> bool:
    """Whether rows of ``host`` may carry blocks of different lengths: its positions ignore the block's padding,
    or it takes none and masked padding changes nothing.  A property of the architecture, asked of the model once
    (every rebuild of a bank would otherwise run the check's forward passes again)."""
    if host not in _PADDING_CHECKS:
        _PADDING_CHECKS[host] = (positions_ignore_padding(host) if compat.takes_position_ids(host)
                                 else padding_is_invisible(host))
    return _PADDING_CHECKS[host]


class PromptStack(Stack):
    """What soft prompts and prefixes share: per-row lengths, the block's mask and the rows' positions."""

    route = Route.INPUT_INPUT
    rewrites_call = True

    def _lengths(self, lengths: list[int], device: torch.device, host: nn.Module) -> None:
        self.takes_positions = compat.takes_position_ids(host)
        self.ignores_padding = rows_may_differ(host)
        self.register_buffer("lengths", torch.tensor([*lengths, 0], device=device), persistent=False)

    def select(self, index: torch.Tensor | None, entry: int | None = None) -> None:
        super().select(index, entry)
        if index is not None:
            self.row_lengths = self.lengths[index]
            self.width = int(self.row_lengths.max())
            self.uniform = bool((self.row_lengths == self.width).all())

    def block_mask(self, like: torch.Tensor) -> torch.Tensor:
        """(batch, N): 1 on each row's ``n_b`` last block positions."""
        slots = torch.arange(self.width, device=like.device)
        return (slots >= self.width - self.row_lengths[:, None]).to(like.dtype)

    def own_positions(self, kwargs: dict, earlier: int, new: int, at: int, device: torch.device) -> None:
        """``position_ids`` of a call that passed none although the rows' lengths differ: for each row, those the
        model gives it alone (``earlier`` cached and ``new`` input tokens after its ``n_b`` prompt or prefix
        positions; a soft prompt's first call also numbers its ``at`` tokens before and the block itself)."""
        if not self.takes_positions:
            if self.ignores_padding:
                return  # relative positions (T5): a row's masked padding changes nothing, nothing to number
            raise ValueError("rows with prompts or prefixes of different lengths (or none) need a model that takes "
                             "position_ids or whose attention ignores masked padding (it counts padding as "
                             "positions); give every row a delta with the same prompt or prefix length")
        mask = compat.padding_mask(kwargs)
        if mask is not None and not bool(mask.all()) and not self.ignores_padding:
            raise ValueError("rows with prompts or prefixes of different lengths (or none) in a padded batch of "
                             "this model need explicit position_ids (it numbers positions by the mask; generate() "
                             "passes them); pass position_ids, or give every row the same prompt or prefix length")
        n = self.row_lengths[:, None]
        if earlier:  # a step after the first: the block is in the cache
            kwargs["position_ids"] = earlier - self.width + n + torch.arange(new, device=device)
            return
        slots = torch.arange(self.width, device=device)
        block = (slots - (self.width - n)).clamp(min=0) + at
        before = torch.arange(at, device=device).expand(len(n), -1)
        after = at + n + torch.arange(new - at, device=device)
        kwargs["position_ids"] = torch.cat([before, block, after], dim=1)

    def shifted(self, positions: torch.Tensor) -> torch.Tensor:
        return positions + self.row_lengths[:, None]


class SoftPromptStack(PromptStack):
    def __init__(self, layers: list[SoftPrompt], host: nn.Module) -> None:
        super().__init__()
        first = layers[0]
        self._embedding, self.insert_at, self.causal_lm, self.limit = (first._embedding, first.insert_at,
                                                                      first.causal_lm, first.limit)
        with torch.no_grad():
            self.register_buffer("block", right_aligned([layer.prompt() for layer in layers], 0),
                                 persistent=False)
        self._lengths([len(layer.soft_embeds) for layer in layers], self.block.device, host)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.index is None or self.width == 0:
            return args, kwargs
        kwargs = dict(kwargs)
        at, width = self.insert_at, self.width
        cache = compat.passed_cache(kwargs)
        cached = compat.cache_length(cache) if cache is not None else 0
        reference = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None)
        batch, new = reference.shape[:2]
        self.rows(reference)
        mask = compat.padding_mask(kwargs)
        if cached:  # a generation step after the first: the block is in the cache
            check_room(self.limit, cached + new, "the soft prompt and the tokens")
            if not self.uniform and kwargs.get("position_ids") is None:
                self.own_positions(kwargs, cached, new, at, reference.device)
            elif kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self.shifted(kwargs["position_ids"])
            if mask is not None:
                kwargs["attention_mask"] = _insert(mask, at, self.block_mask(mask))
            elif not self.uniform:
                full = torch.ones(batch, cached - width + new, dtype=torch.long, device=reference.device)
                kwargs["attention_mask"] = _insert(full, at, self.block_mask(full))
            compat.shift_cache_position(kwargs, width)
            return args, kwargs
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self._embedding[0](ids)
        check_room(self.limit, new + width, f"the soft prompt and an input of {new} tokens")
        if not self.uniform and kwargs.get("position_ids") is None:
            self.own_positions(kwargs, 0, new, at, reference.device)
        elif kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
            start = positions[:, at - 1:at] + 1 if at else positions.amin(dim=1, keepdim=True)
            block = start + (torch.arange(width, device=positions.device) - (width - self.row_lengths[:, None]))
            kwargs["position_ids"] = torch.cat([positions[:, :at], block.clamp(min=0), self.shifted(positions[:, at:])],
                                               dim=1)
        kwargs["inputs_embeds"] = _insert(embeds, at, self.block[self.index, -width:])  # this batch's widest
        if mask is None and not self.uniform:
            mask = kwargs["attention_mask"] = torch.ones(batch, new, dtype=torch.long, device=reference.device)
        if mask is not None and mask.shape[1] == new:
            kwargs["attention_mask"] = _insert(mask, at, self.block_mask(mask))
        if kwargs.get("token_type_ids") is not None and kwargs["token_type_ids"].shape[1] == new:
            kwargs["token_type_ids"] = _insert(kwargs["token_type_ids"], at, kwargs["token_type_ids"].new_zeros(
                batch, width))
        if self.causal_lm and kwargs.get("labels") is not None:
            kwargs["labels"] = _insert(kwargs["labels"], at, kwargs["labels"].new_full((batch, width), -100))
        compat.shift_cache_position(kwargs, width, extend=True)
        return args, kwargs


class PromptMaskStack(PromptStack):
    """An encoder-decoder's own call: the mask its cross-attention reads covers each row's block."""

    def __init__(self, layers: list[EncoderMaskExtension], host: nn.Module) -> None:
        super().__init__()
        self._lengths([layer.soft_token_num for layer in layers], torch.device("cpu"), host)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.index is None or self.width == 0:
            return args, kwargs
        mask = compat.padding_mask(kwargs)
        if mask is None:
            reference = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None)
            mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        return args, {**kwargs, "attention_mask": _insert(mask, 0, self.block_mask(mask))}


class PrefixStack(PromptStack):
    """Prefixes entering through the model's KV cache (decoders, and encoders whose attention reads one)."""

    fills_cache = True  # runs after the soft prompts of the same call (routing)

    def __init__(self, layers: list[Prefix], host: nn.Module) -> None:
        super().__init__()
        first = layers[0]
        self.limit, self.filled, self.encoder_decoder, self.cache_name = (first.limit, first.filled,
                                                                          first.encoder_decoder, first.cache_name)
        if self.encoder_decoder:
            raise TypeError("prefixes of encoder-decoders have no row form yet (their encoder and cross-attention "
                            "prefixes enter each attention on its own); route them one delta at a time")
        with torch.no_grad():
            tables = [layer.key_values(range(self.filled)) for layer in layers]  # per layer (heads, n, size) pairs
            for layer_index in range(self.filled):
                for part, name in ((0, "keys"), (1, "values")):
                    self.register_buffer(f"{name}_{layer_index}", right_aligned(
                        [table[layer_index][part] for table in tables], 1), persistent=False)
        self._lengths([layer.length for layer in layers], self.keys_0.device, host)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.index is None or self.width == 0:
            return args, kwargs
        kwargs = dict(kwargs)
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        self.rows(reference)
        batch, new = reference.shape[:2]
        cache = compat.passed_cache(kwargs)
        if cache is None or kwargs.get("use_cache") is False:
            cache = compat.new_cache()
        earlier = compat.cache_length(cache)
        if earlier == 0:
            width = self.width  # the block: the widest prefix of these rows, others padded on the left
            for layer in range(self.filled):
                keys, values = getattr(self, f"keys_{layer}")[self.index], getattr(self, f"values_{layer}")[self.index]
                compat.fill_cache(cache, layer, keys[:, :, -width:], values[:, :, -width:])
            earlier = width
        compat.put_cache(kwargs, self.cache_name, cache)
        check_room(self.limit, earlier + new, "the prefix, earlier tokens and this input")
        if not self.uniform and kwargs.get("position_ids") is None:
            self.own_positions(kwargs, earlier, new, 0, reference.device)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.shifted(kwargs["position_ids"])
        mask = compat.padding_mask(kwargs)
        if mask is None:
            mask = torch.ones(batch, earlier - self.width + new, dtype=torch.long, device=reference.device)
        kwargs["attention_mask"] = torch.cat([self.block_mask(mask), mask], dim=1)
        compat.shift_cache_position(kwargs, self.width)
        return args, kwargs


def prompt_kind(layer: nn.Module) -> tuple[type[Stack], tuple] | None:
    if isinstance(layer, SoftPrompt):
        return SoftPromptStack, (layer.insert_at,)
    if isinstance(layer, EncoderMaskExtension):
        return PromptMaskStack, ()
    if isinstance(layer, Prefix):
        return PrefixStack, ()
    return None
