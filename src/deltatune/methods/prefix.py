"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes at every attention layer, input -> input route.

::

    E: n × embed_dim (trainable)  --MLP-->  [K_1, V_1, …, K_L, V_L]: n keys and values per layer and KV head
    attention_l(x) = softmax(q [K_l; k(x)]ᵀ / √d) [V_l; v(x)]

With ``reparameterize`` (the default) the prefixes come from ``E`` through ``Linear(embed_dim, mid_dim) → tanh →
Linear(mid_dim, L·2·h_kv·d_h)``, which trains more stably; :meth:`PrefixModel.fold` replaces the MLP by the
prefixes it produces once training is done.  Without it the prefixes are trained directly.

The prefix enters the model as a pre-filled KV cache: the delta rewrites the model's call so ``past_key_values``
holds the ``n`` prefix positions and the ``attention_mask`` is extended by ``n`` ones; explicit ``position_ids``
shift by ``n``, as when a cache holds ``n`` earlier tokens.  ``generate()`` works (the cache it passes is filled at
its first step), and outputs keep the length of the inputs.  Decoders (GPT-2, OPT, the LLaMA family with
grouped-query attention) and encoders whose attention reads a cache (BERT, RoBERTa: the bare model under the task
head is hooked; token positions then start after the prefix, as with any cache); encoder-decoders not yet.
Parameters: ``n·embed_dim + embed_dim·mid_dim + mid_dim + mid_dim·L·2·h_kv·d_h + L·2·h_kv·d_h`` reparameterized,
``n·L·2·h_kv·d_h`` otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..base import DeltaBase
from ..config import DeltaConfig
from ..probe import Seen
from ..routing import Route
from .bottleneck import check_positive


@dataclass
class PrefixConfig(DeltaConfig):
    prefix_token_num: int = 6
    reparameterize: bool = True
    embed_dim: int = 512
    mid_dim: int = 512

    def __post_init__(self) -> None:
        for name in ("prefix_token_num", "embed_dim", "mid_dim"):
            check_positive(name, getattr(self, name))


def _attention_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def _takes_cache(module: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(type(module).forward).parameters


def _cache_taking_module(model: nn.Module) -> str:
    """Where the prefix enters: the model's own call if it takes a cache (decoders with an LM head), else the bare
    model under the task head (``BertForSequenceClassification`` -> ``bert``)."""
    if _takes_cache(model):
        return ""
    base = getattr(model, "base_model", model)
    return next((name for name, module in model.named_modules() if module is base), "")


class Prefix(nn.Module):
    """Fill the call's KV cache with the prefix and extend its mask."""

    rewrites_call = True

    def __init__(self, config: PrefixConfig, shape: tuple[int, int, int], seen: Seen) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = shape
        factory = {"device": seen.device, "dtype": seen.dtype}
        n, width = config.prefix_token_num, self.layers * 2 * self.kv_heads * self.head_dim
        self.length = n
        if config.reparameterize:
            self.embedding = nn.Parameter(torch.randn(n, config.embed_dim, **factory))
            self.mlp = nn.Sequential(nn.Linear(config.embed_dim, config.mid_dim, **factory), nn.Tanh(),
                                     nn.Linear(config.mid_dim, width, **factory))
        else:
            self.prefix = nn.Parameter(torch.randn(n, width, **factory) * 0.02)

    def key_values(self) -> torch.Tensor:
        """(layers, 2, kv_heads, n, head_dim)."""
        flat = self.mlp(self.embedding) if hasattr(self, "mlp") else self.prefix
        n = flat.shape[0]
        return flat.view(n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs["inputs_embeds"]
        batch, length = reference.shape[:2]
        cache = kwargs.get("past_key_values")
        if kwargs.get("use_cache") is False:
            # The model returns the cache made here even then, and generate() would feed it back: start afresh.
            cache = None
        if cache is None or cache.get_seq_length() == 0:  # first call: put the prefix in the cache
            cache = cache if cache is not None else DynamicCache()
            key_values = self.key_values()
            for layer in range(self.layers):
                keys, values = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in key_values[layer])
                cache.update(keys, values, layer)
            kwargs["past_key_values"] = cache
        n = self.length
        mask = kwargs.get("attention_mask")
        if mask is None:  # attend to everything: the prefix, earlier cached tokens and the new ones
            mask = torch.ones(batch, cache.get_seq_length() - n + length, dtype=torch.long, device=reference.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return args, kwargs

    def fold(self) -> None:
        with torch.no_grad():
            folded = self.mlp(self.embedding)
        del self.mlp, self.embedding
        self.prefix = nn.Parameter(folded)


class PrefixModel(DeltaBase):
    """Prefix tuning: ``prefix_token_num`` trainable key/value positions prepended at every attention layer."""

    delta_type = "prefix"
    config_class = PrefixConfig
    route = Route.INPUT_INPUT

    takes_modules = False

    def resolve_positions(self) -> list[str]:
        return [_cache_taking_module(self.backbone_model)]

    def fold(self) -> PrefixModel:
        """Replace the reparameterization MLP by the prefixes it produces (after training: same outputs, and the
        checkpoint holds only ``n·L·2·h_kv·d_h`` numbers).  Build a new optimizer if training goes on."""
        if self.config.reparameterize:
            for prefix in self.deltas.values():
                prefix.fold()
            self.config.reparameterize = False
        return self

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        config = getattr(self.backbone_model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False) or not _takes_cache(module):
            raise TypeError(
                f"PrefixModel supports transformers decoders and encoders whose forward takes past_key_values, "
                f"not {type(module).__name__} (encoder-decoders are not supported yet)"
            )
        return Prefix(self.config, _attention_shape(config), seen)
