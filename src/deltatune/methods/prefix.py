"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes at every attention layer, input -> input route.

::

    E: n × embed_dim (trainable)  --MLP-->  [K_1, V_1, …, K_L, V_L]: n keys and values per attention layer and head
    attention_l(x) = softmax(q [K_l; k(x)]ᵀ / √d) [V_l; v(x)]

With ``reparameterize`` (the default) the prefixes come from ``E`` through ``Linear(embed_dim, mid_dim) → tanh →
Linear(mid_dim, Σ_l 2·h_l·d_l)``, which trains more stably; :meth:`PrefixModel.fold` replaces the MLP by the
prefixes it produces once training is done.  Without it the prefixes are trained directly.

The prefixes enter as keys and values the attention reads from a KV cache, so no attention code is replaced:

- decoders (GPT-2, OPT, the LLaMA family with grouped-query attention) and encoders whose attention reads a cache
  (BERT, RoBERTa: the bare model under the task head): the model's call is rewritten so its KV cache argument holds
  the ``n`` prefix positions and the ``attention_mask`` is extended by ``n`` ones; explicit ``position_ids`` shift
  by ``n``, as when a cache holds ``n`` earlier tokens;
- encoder-decoders (T5, BART): the decoder stack's call gets the decoder self-attention prefixes the same way (in
  the self-attention half of an ``EncoderDecoderCache``); each encoder self-attention and decoder cross-attention
  call gets its prefix through the attention's own cache argument (a one-call cache, or the cross
  half of the model's cache before the encoder keys enter it) and its 4-D mask is extended by ``n`` columns.

Head shapes are read from the cache the model fills, so prefixes take whatever form the model caches: fewer
key/value heads under grouped-query attention, and under multi-head latent attention (DeepSeek-V3, MiniCPM3) the
compressed latent and rotary key part that the attention decompresses into keys and values.

``generate()`` works (the cache it passes is filled at its first step), and outputs keep the length of the inputs.
The prefix takes ``n`` positions: with a learned position table, ``n`` + earlier tokens + input must fit it.
Parameters: ``n·embed_dim + embed_dim·mid_dim + mid_dim + (mid_dim + 1)·Σ_l 2·h_l·d_l`` reparameterized,
``n·Σ_l 2·h_l·d_l`` otherwise (``L·2·h_kv·d_h`` for a decoder of ``L`` layers; with keys and values of
different sizes, as in multi-head latent attention, ``2·d_l`` is their sum).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import compat
from ..base import DeltaBase
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen, from_weights, keyword_inputs
from ..structures import fused
from ..routing import Route
from .positions import check_room
from .prefix_rows import PrefixKeysValues, PrefixRows, check_hidden_prefix, row_layers

CROSS_ATTENTION = re.compile(r"encdec|encoder_?attn|cross", re.IGNORECASE)  # T5, BART/Marian/…, BERT-style


@dataclass
class PrefixConfig(DeltaConfig):
    prefix_token_num: int = hyper(6, low=1, high=MAX_SIZE)
    reparameterize: bool = True
    embed_dim: int = hyper(512, low=1, high=MAX_SIZE)
    mid_dim: int = hyper(512, low=1, high=MAX_SIZE)


def _attention_shape(attention: nn.Module) -> tuple[int, int, int]:
    """(key/value heads, key size, value size) of a T5 / BART-style attention module, from its key projection."""
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "key_value_proj_dim", None)
    key = getattr(attention, "k_proj", None) or getattr(attention, "k", None)
    if not isinstance(head_dim, int) or not isinstance(key, nn.Linear):
        raise TypeError(f"PrefixModel reads an encoder-decoder attention's head size from head_dim or "
                        f"key_value_proj_dim and its key projection k_proj or k; {type(attention).__name__} has "
                        "not both")
    return key.out_features // head_dim, head_dim, head_dim


def _cache_attentions(stack: nn.Module, prefix: str) -> list[str]:
    """Full names of the innermost modules under ``stack`` that take a cache: its attention modules, in order."""
    named = [(n, m) for n, m in stack.named_modules() if compat.cache_argument(m)]
    return [".".join(filter(None, (prefix, n))) for n, m in named
            if not any(o is not m and compat.cache_argument(o) for o in m.modules())]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


class PrefixTable(nn.Module):
    """The prefixes of every attention layer: ``shapes[l] = (heads, key size, value size)``."""

    def __init__(self, config: PrefixConfig, shapes: list[tuple[int, int, int]], seen: Seen) -> None:
        super().__init__()
        factory = {"device": seen.device, "dtype": seen.dtype}
        self.length = n = config.prefix_token_num
        self.shapes = shapes
        widths = [heads * (key + value) for heads, key, value in shapes]
        ends = torch.tensor(widths).cumsum(0).tolist()
        self.rows = [slice(end - width, end) for end, width in zip(ends, widths)]  # layer l's columns of the table
        if config.reparameterize:
            self.embedding = nn.Parameter(torch.randn(n, config.embed_dim, **factory))
            self.mlp = nn.Sequential(nn.Linear(config.embed_dim, config.mid_dim, **factory), nn.Tanh(),
                                     nn.Linear(config.mid_dim, ends[-1], **factory))
        else:
            self.prefix = nn.Parameter(torch.randn(n, ends[-1], **factory) * 0.02)

    def key_values(self, layers: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer keys and values ``(heads, n, size)``; only the needed rows of the MLP's last layer are
        computed.  A layer's columns of the table are its keys, then its values."""
        if hasattr(self, "mlp"):
            hidden, last = self.mlp[1](self.mlp[0](self.embedding)), self.mlp[2]
            flats = [F.linear(hidden, last.weight[self.rows[i]], last.bias[self.rows[i]]) for i in layers]
        else:
            flats = [self.prefix[:, self.rows[i]] for i in layers]
        pairs = []
        for flat, i in zip(flats, layers):
            heads, key, value = self.shapes[i]
            keys, values = flat.split([heads * key, heads * value], dim=1)
            pairs.append((keys.view(self.length, heads, key).transpose(0, 1),
                          values.view(self.length, heads, value).transpose(0, 1)))
        return pairs

    def fold(self) -> None:
        with torch.no_grad():
            folded = self.mlp(self.embedding)
        del self.mlp, self.embedding
        self.prefix = nn.Parameter(folded)


class Prefix(PrefixTable):
    """The prefix table; fills a model call's KV cache with the prefixes of its first ``filled`` layers."""

    rewrites_call = True
    fills_cache = True  # runs after the soft prompts of the same call (routing)
    exclusive = True  # a second prefix could not tell the first call from a cache the first one filled

    def __init__(self, config: PrefixConfig, shapes: list[tuple[int, int, int]], filled: int, host: nn.Module,
                 seen: Seen, encoder_decoder: bool = False) -> None:
        limit, n = compat.position_limit(host), config.prefix_token_num
        check_room(limit, n + 1, f"prefix_token_num={n} and one token of input")
        super().__init__(config, shapes, seen)
        self.limit, self.filled, self.encoder_decoder = limit, filled, encoder_decoder
        self.cache_name = compat.cache_argument(host)
        self._host = (host,)  # a tuple: not a submodule of its own delta

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.training and (layer := compat.checkpointing_layer(self._host[0])):
            raise RuntimeError(f"prefix tuning hands its keys and values to the attention through the KV cache, and "
                               f"transformers drops the cache in layers that checkpoint gradients (here {layer}): "
                               "turn gradient checkpointing off to train a prefix (model.gradient_checkpointing_disable"
                               "() or activation_checkpointing_disable()); LoRA, adapters and soft prompts work with it")
        kwargs = dict(kwargs)
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        batch, length = reference.shape[:2]
        cache = compat.passed_cache(kwargs)
        if cache is None or kwargs.get("use_cache") is False:
            # Even with use_cache=False the model returns the cache made here, and generate() would feed it back.
            cache = compat.new_cache(self.encoder_decoder)
            if kwargs.get("use_cache") is False:  # Whisper's decoder hands its layers no cache then: no prefix
                kwargs["use_cache"] = True
        if compat.cache_length(cache) == 0:  # first call: put the prefix in the (self-attention) cache
            target = compat.self_attention_cache(cache)
            for layer, (keys, values) in enumerate(self.key_values(range(self.filled))):
                compat.fill_cache(target, layer, keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
        compat.put_cache(kwargs, self.cache_name, cache)
        n, cached = self.length, compat.cache_length(cache)
        check_room(self.limit, cached + length, f"the prefix ({n}), earlier tokens ({cached - n}) and this input "
                                                 f"({length})")
        mask = compat.padding_mask(kwargs)
        if mask is None:  # attend to everything: the prefix, earlier cached tokens and the new ones
            mask = torch.ones(batch, cached - n + length, dtype=torch.long, device=reference.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        compat.shift_cache_position(kwargs, n)
        return args, kwargs


class AttentionPrefix(nn.Module):
    """One encoder self-attention or decoder cross-attention: its prefix enters through the call's own cache."""

    rewrites_call = True
    exclusive = True

    def __init__(self, table: Prefix, layer: int, attention: nn.Module, cross: bool) -> None:
        super().__init__()
        self._table = [table]  # in a list: the table's parameters belong to the stack's delta, not to this one
        # A cross-attention's prefix goes into the model's cache, at the attention's own layer
        self.layer, self.cache_layer = layer, compat.layer_index(attention) if cross else None
        self.cache_name = compat.cache_argument(attention)
        self.mask_name = compat.attention_mask_argument(attention)

    def _prefix(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._table[0].key_values(range(self.layer, self.layer + 1))[0]
        return keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        states = kwargs.get("key_value_states")
        batch = (states if states is not None else kwargs["hidden_states"]).shape[0]
        cache = compat.passed_cache(kwargs)
        if cache is None:  # encoder self-attention, or cross-attention without a cache: a cache for this call
            cache = compat.one_call_cache(*self._prefix(batch))
            # The prefix takes the first n positions: relative position biases (T5) must see the tokens after it.
            compat.shift_cache_position(kwargs, self._table[0].length)
        elif not compat.cross_attention_filled(cache, self.cache_layer):  # first step: prefix before encoder keys
            compat.fill_cache(compat.cross_attention_cache(cache), self.cache_layer, *self._prefix(batch))
        compat.put_cache(kwargs, self.cache_name, cache)
        kwargs[self.mask_name] = compat.extend_mask(kwargs.get(self.mask_name), self._table[0].length)
        return args, kwargs


class PrefixModel(DeltaBase):
    """Prefix tuning: ``prefix_token_num`` trainable key/value positions prepended at every attention layer."""

    delta_type = "prefix"
    config_class = PrefixConfig
    route = Route.INPUT_INPUT

    takes_modules = False

    def __init__(self, *args, attach: bool = True, **kwargs) -> None:
        super().__init__(*args, attach=False, **kwargs)
        if self._row_layers:
            rows = [d for d in self.deltas.values() if isinstance(d, PrefixRows)]
            check_hidden_prefix(self.backbone_model, rows, self.attach, self.detach,
                                keyword_inputs(self.backbone_model, self.pseudo_input))
        if attach:
            self.attach()

    @functools.cached_property
    def _row_layers(self) -> dict[str, tuple[str, str]]:
        return row_layers(self.backbone_model)

    def resolve_positions(self) -> list[str]:
        model = self.backbone_model
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            decoder = model.get_decoder()
            if not compat.cache_argument(decoder):
                raise compat.CompatibilityError(f"PrefixModel needs a decoder that takes a KV cache argument "
                                                f"({' or '.join(compat.CACHE_ARGUMENTS)}), not {type(decoder).__name__}")
            decoder_name = _name_of(model, decoder)
            cross = [n for n in _cache_attentions(decoder, decoder_name) if CROSS_ATTENTION.search(n.split(".")[-1])]
            return [decoder_name, *_cache_attentions(model.get_encoder(), _name_of(model, model.get_encoder())), *cross]
        if self._row_layers:  # attention without a cache: prefix rows on each attention and its k, v
            return list(dict.fromkeys(p for attention, pair in self._row_layers.items() for p in (attention, *pair)))
        if compat.cache_argument(model):
            return [""]  # decoders with an LM head
        base = getattr(model, "base_model", model)  # BertForSequenceClassification -> bert
        return [_name_of(model, base)]

    def fold(self) -> PrefixModel:
        """Replace the reparameterization MLP by the prefixes it produces (after training: same outputs, and the
        checkpoint holds only ``n·Σ_l 2·h_l·d_l`` numbers).  Build a new optimizer if training goes on."""
        if self.config.reparameterize:
            for delta in self.deltas.values():
                table = getattr(delta, "table", delta)
                if isinstance(table, PrefixTable):
                    table.fold()
            self.config.reparameterize = False
        return self

    def _build_rows(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        """Attention without a cache: one table of all layers, held by the first attention's PrefixRows; each
        layer's key and value projections add their rows of it."""
        layers = list(self._row_layers.items())
        sizes = [[len(t) if isinstance(t, torch.Tensor) else from_weights(self.backbone_model.get_submodule(p))
                  .hidden_size for p, t in zip(pair, self._targets(pair))] for _, pair in layers]
        table = PrefixTable(self.config, [(1, *pair) for pair in sizes], seen[layers[0][0]])
        deltas: dict[str, nn.Module] = {}
        for index, (attention, pair) in enumerate(layers):
            deltas[attention] = PrefixRows(self.config.prefix_token_num, modules[attention], table if index == 0 else None)
            keys, values = self._targets(pair)
            for position in dict.fromkeys(pair):  # one module when k and v are slices of a fused projection
                deltas[position] = PrefixKeysValues(table, index, keys if position == pair[0] else False,
                                                    values if position == pair[1] else False)
        return {position: deltas[position] for position in modules}

    def _targets(self, pair: tuple[str, str]) -> tuple[torch.Tensor | bool, torch.Tensor | bool]:
        """Which output features take the keys and the values: all (True), or a fused projection's k and v."""
        for position in pair:
            if from_weights(self.backbone_model.get_submodule(position)) is None:
                raise TypeError(f"PrefixModel puts prefix rows on linear key and value projections, not {position}")
        if pair[0] != pair[1]:
            return True, True
        module = self.backbone_model.get_submodule(pair[0])
        rows = fused.qkv_rows(self.backbone_model, pair[0], from_weights(module).hidden_size)
        if rows is None:
            raise TypeError(f"PrefixModel needs the q/k/v layout of {pair[0]} to put prefix keys and values in it; "
                            f"known layouts: {', '.join(fused.known_layouts())}")
        return rows["k"], rows["v"]

    def route_at(self, position: str) -> Route:
        return Route.OUTPUT_OUTPUT if any(position in pair for pair in self._row_layers.values()) else self.route

    def build_all(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        """One table of prefixes for all layers, held by the first position's module (the model or its decoder);
        an encoder-decoder's encoder and cross-attentions read their rows of it."""
        if self._row_layers:
            return self._build_rows(modules, seen)
        first, *others = self.positions
        module = modules[first]
        config = getattr(self.backbone_model, "config", None)
        if config is None or not compat.cache_argument(module):
            raise compat.CompatibilityError(
                f"PrefixModel supports transformers models whose attention takes a KV cache argument "
                f"({' or '.join(compat.CACHE_ARGUMENTS)}), not {type(module).__name__}"
            )
        if not getattr(config, "is_encoder_decoder", False):
            shapes = compat.cached_head_shapes(module, keyword_inputs(self.backbone_model, self.pseudo_input))
            return {first: Prefix(self.config, shapes, len(shapes), module, seen[first])}
        named = dict(self.backbone_model.named_modules())
        cross = set(others) & {n for n in named if CROSS_ATTENTION.search(n.split(".")[-1])}
        decoder_self = [n for n in _cache_attentions(module, first) if n not in cross]
        layers = [*decoder_self, *others]  # table rows: decoder self, encoder self, cross
        if len(cross) != len(decoder_self):
            raise TypeError(f"PrefixModel found {len(decoder_self)} decoder self-attention and {len(cross)} "
                            f"cross-attention modules in {type(module).__name__}; expected one of each per layer")
        table = Prefix(self.config, [_attention_shape(named[n]) for n in layers], len(decoder_self), module,
                       seen[first], encoder_decoder=True)
        return {first: table, **{p: AttentionPrefix(table, layers.index(p), modules[p], p in cross) for p in others}}
