"""Every assumption deltatune makes about transformers' internals, in one place.

Features are detected by inspection (a ``forward`` signature, an attribute), never by version number; a missing
feature raises :class:`CompatibilityError`, which names the installed transformers version, so a new release breaks
this module and its tests loudly instead of changing a result silently.  Method files import from here; no other
module of the package names a transformers object that is not its public model API.

What is assumed, and how it is found:

- a model, a decoder stack and an attention module take their KV cache as a keyword argument named ``cache``
  (transformers 5.24 and later) or ``past_key_values`` (earlier); :func:`cache_argument` reads the signature;
- a cache is a ``transformers.Cache``: ``get_seq_length()``, ``update(keys, values, layer)`` with tensors of shape
  ``(batch, heads, positions, head_dim)``; an encoder-decoder's is an ``EncoderDecoderCache`` with a
  ``self_attention_cache``, a ``cross_attention_cache`` and ``is_updated[layer]`` (cross keys already computed);
- before 5.4, a call also names the cache slots it writes as ``cache_position`` (1-D, ascending);
- an attention module knows its cache row as ``layer_idx`` and takes its mask as ``mask`` (T5) or
  ``attention_mask``, a 4-D mask that is boolean (True: visible) or additive (0: visible);
- GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` (weight stored ``(in, out)``);
- activation functions are looked up by name in ``transformers.activations.ACT2FN``;
- a learned position table is an ``nn.Embedding`` named like ``position_embeddings``, ``wpe`` or
  ``embed_positions``, whose first ``offset`` rows (OPT, BART) or rows up to ``padding_idx`` (RoBERTa) are unused.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Cache, DynamicCache, EncoderDecoderCache
from transformers.activations import ACT2FN
from transformers.generation.streamers import BaseStreamer  # the base of generate()'s token streamers
from transformers.pytorch_utils import Conv1D

__all__ = ["ACTIVATIONS", "BaseStreamer", "CACHE_ARGUMENTS", "Cache", "CompatibilityError", "Conv1D", "activation",
           "attention_mask_argument", "cache_argument", "cache_length", "cross_attention_cache", "takes_position_ids",
           "cross_attention_filled", "extend_mask", "fill_cache", "layer_index", "new_cache", "padding_mask",
           "passed_cache", "position_limit", "put_cache", "self_attention_cache", "shift_cache_position"]

TRANSFORMERS_VERSION = transformers.__version__
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the current name first
ACTIVATIONS = tuple(sorted(ACT2FN))
POSITION_TABLE = re.compile(r"^(position_embeddings|wpe|embed_positions)$")


class CompatibilityError(TypeError):
    """transformers does not have what deltatune relies on here (a renamed argument, a changed cache)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (transformers {TRANSFORMERS_VERSION}; see docs/compatibility.md for the tested "
                         "range)")


@functools.lru_cache(maxsize=None)
def _forward_parameters(module_class: type[nn.Module]) -> frozenset[str]:
    return frozenset(inspect.signature(module_class.forward).parameters)


def takes_position_ids(module: nn.Module) -> bool:
    return "position_ids" in _forward_parameters(type(module))


def cache_argument(module: nn.Module) -> str | None:
    """The keyword under which ``module.forward`` takes a KV cache, or None if it takes none."""
    parameters = _forward_parameters(type(module))
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


_STATELESS_OUTPUTS = {"loss", "logits", "hidden_states", "attentions", "cross_attentions", "aux_loss",
                      "router_logits"}


def keeps_state(module: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether ``module`` returns anything a next call could continue from (a cache, a recurrent state), asked
    for with ``use_cache=True``: the signature cannot tell, a renamed cache argument hides under ``**kwargs``."""
    from .probe import evaluating

    with evaluating(module):
        output = module(**inputs, use_cache=True)
    if not hasattr(output, "items"):
        return True  # a plain tuple: nothing says what it holds
    return any(value is not None for key, value in output.items() if key not in _STATELESS_OUTPUTS)


def passed_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a call received, under any of its names; a ``Cache`` under an unknown name is an error, since
    ignoring it would silently treat a continued generation as a fresh input."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            if not isinstance(cache, Cache):
                raise CompatibilityError(f"{name!r} holds a {type(cache).__name__}, not a transformers Cache; "
                                         "legacy tuple caches are not supported")
            parts = (cache.self_attention_cache, cache.cross_attention_cache) if isinstance(
                cache, EncoderDecoderCache) else (cache,)
            if not all(isinstance(part, DynamicCache) for part in parts):
                # A fixed-size cache has no room for prefix or prompt positions, and generate() hands it 4-D masks.
                raise TypeError(f"prefixes and soft prompts need a growing KV cache (DynamicCache, generate()'s "
                                f"default), not {type(cache).__name__}; drop cache_implementation or pass a "
                                "DynamicCache")
            return cache
    unknown = [key for key, value in kwargs.items() if isinstance(value, Cache)]
    if unknown:
        raise CompatibilityError(f"a KV cache arrived as {unknown[0]!r}, which deltatune does not know as a cache "
                                 f"argument (known: {', '.join(CACHE_ARGUMENTS)})")
    return None


def put_cache(kwargs: dict[str, Any], name: str, cache: Cache) -> None:
    """Pass ``cache`` as ``name``, dropping it under the other names (a caller may use the deprecated one)."""
    for other in CACHE_ARGUMENTS:
        kwargs.pop(other, None)
    kwargs[name] = cache


def new_cache(encoder_decoder: bool = False) -> Cache:
    return EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder else DynamicCache()


class _OneCallCache(DynamicCache):
    """The cache of one attention call: a single layer, whatever index the attention names (encoder attentions of
    BART-derived models are built without one)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None, *args, **kwargs):
        return super().update(key_states, value_states, 0, *args, **kwargs)


def one_call_cache(keys: torch.Tensor, values: torch.Tensor) -> Cache:
    """A cache holding ``keys`` and ``values`` for the one attention call it is passed to."""
    cache = _OneCallCache()
    cache.update(keys, values, 0)
    return cache


def cache_length(cache: Cache) -> int:
    """Positions already in the (self-attention) cache."""
    return cache.get_seq_length()


def self_attention_cache(cache: Cache) -> Cache:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def cross_attention_cache(cache: Cache) -> Cache:
    if not isinstance(cache, EncoderDecoderCache):
        raise CompatibilityError(f"a cross-attention prefix needs an EncoderDecoderCache, got {type(cache).__name__}")
    return cache.cross_attention_cache


def fill_cache(cache: Cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append ``keys`` and ``values`` of shape ``(batch, heads, positions, head_dim)`` to ``layer`` of ``cache``."""
    cache.update(keys, values, layer)


def generation_setting(config: transformers.GenerationConfig, name: str) -> Any:
    """A generation setting as generate() applies it: the config's own, else transformers' default (recent releases
    leave unset settings None and fill in their defaults when generate() runs, e.g. ``top_k`` 50)."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    defaults = getattr(type(config), "_get_default_generation_params", None)
    return defaults().get(name) if defaults is not None else getattr(transformers.GenerationConfig(), name, None)


def cache_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a DynamicCache of full-attention layers, each ``(batch, heads, positions,
    head_dim)``; raises for any other kind of cache."""
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        kinds = ", ".join(sorted({type(layer).__name__ for layer in layers or []})) or "no layers"
        raise CompatibilityError(f"expected a DynamicCache of full-attention layers (DynamicLayer), got a "
                                 f"{type(cache).__name__} ({kinds})")
    return [(layer.keys, layer.values) for layer in layers]


def checkpointing_layer(module: nn.Module) -> str | None:
    """The class of the innermost module under ``module`` that checkpoints gradients in training, if any.
    transformers runs such layers without their KV cache (``GradientCheckpointingLayer`` sets it to None), so
    nothing a cache carries reaches their attention."""
    found = [type(inner).__name__ for inner in module.modules()
             if getattr(inner, "gradient_checkpointing", False) is True and inner.training]
    return found[-1] if found else None


def cross_attention_filled(cache: Cache, layer: int) -> bool:
    """Whether an encoder-decoder cache already holds ``layer``'s cross-attention keys (after the first step)."""
    cross_attention_cache(cache)  # checks the type
    updated = getattr(cache, "is_updated", None)
    if not isinstance(updated, dict):
        raise CompatibilityError("EncoderDecoderCache has no is_updated dictionary of filled cross-attention layers")
    return bool(updated.get(layer))


def cached_head_shapes(model: nn.Module, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(key/value heads, key size, value size) of every layer of the KV cache ``model`` fills for ``inputs``: what
    it really stores, also for multi-query, grouped-query, latent (keys and values of different sizes) or per-layer
    head layouts its config spells in its own way.  The model must also run ``inputs`` again after that cache, as
    it will after a prefix."""
    cache = new_cache()
    # a model with a cache class of its own (hybrid, compressed) refuses ours
    _run_with_cache(model, inputs, cache, "does not run with a DynamicCache, which prefix tuning fills")
    if not cache.layers or cache.get_seq_length() == 0:
        raise CompatibilityError(f"{type(model).__name__} did not fill the KV cache it was given")
    shapes = _head_shapes(model, cache)
    mask = inputs.get("attention_mask")
    continued = inputs if mask is None else {**inputs, "attention_mask": torch.cat([torch.ones_like(mask), mask], 1)}
    _run_with_cache(model, continued, cache, "does not run an input of several tokens after a filled KV cache, "
                    "which prefix tuning needs")
    return shapes


def _run_with_cache(model: nn.Module, inputs: dict[str, Any], cache: Cache, failure: str) -> None:
    from .probe import evaluating

    try:
        with evaluating(model):
            model(**inputs, **{cache_argument(model): cache}, use_cache=True)
    except Exception as error:
        raise TypeError(f"{type(model).__name__} {failure} ({type(error).__name__}: {error})") from error


def _head_shapes(model: nn.Module, cache: Cache) -> list[tuple[int, int, int]]:
    shapes = []
    for index, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4):
            raise TypeError(f"layer {index} of {type(model).__name__}'s cache ({type(layer).__name__}) holds no "
                            "attention keys and values; prefix tuning needs them in every layer")
        if keys.shape[1] != values.shape[1]:
            raise TypeError(f"layer {index} of {type(model).__name__} caches keys {tuple(keys.shape)} and values "
                            f"{tuple(values.shape)} for different numbers of heads; prefix tuning needs them alike")
        shapes.append((keys.shape[1], keys.shape[3], values.shape[3]))
    return shapes


def layer_index(attention: nn.Module) -> int:
    index = getattr(attention, "layer_idx", None)
    if not isinstance(index, int):
        raise CompatibilityError(f"{type(attention).__name__} has no integer layer_idx naming its cache layer")
    return index


def attention_mask_argument(attention: nn.Module) -> str:
    parameters = _forward_parameters(type(attention))
    for name in ("mask", "attention_mask"):
        if name in parameters:
            return name
    raise CompatibilityError(f"{type(attention).__name__}.forward takes neither 'mask' nor 'attention_mask'")


def padding_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A model call's ``attention_mask``: 2-D (batch, keys), 1 for a token to attend to; a prepared 4-D mask cannot
    be extended by position, so it is refused."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise TypeError(f"prefixes and soft prompts extend a 2-D attention_mask (batch, tokens); got one of shape "
                        f"{tuple(mask.shape)}")
    return mask


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Let every query see ``n`` more keys on the left: boolean masks get True, additive masks 0."""
    if mask is None:
        return None
    fill = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([fill(*mask.shape[:-1], n), mask], dim=-1)


def shift_cache_position(kwargs: dict[str, Any], n: int, extend: bool = False) -> None:
    """Before transformers 5.4 a call also named the cache slots it writes (``cache_position``): move them ``n``
    slots on, past a prefix or prompt already cached, or (``extend``) add ``n`` slots for prompt tokens inserted now."""
    slots = kwargs.get("cache_position")
    if slots is None:
        return
    if extend:
        kwargs["cache_position"] = torch.arange(slots.shape[-1] + n, device=slots.device) + slots[..., :1]
    else:
        kwargs["cache_position"] = slots + n


def activation(name: str) -> nn.Module:
    if name not in ACT2FN:
        raise ValueError(f"unknown non_linearity {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACT2FN[name]


def position_limit(module: nn.Module) -> int | None:
    """How many token positions ``module`` can embed: the size of its learned position table, less the rows it
    never uses (OPT and BART start at ``offset`` 2, RoBERTa after its padding index); None without such a table
    (rotary, relative or ALiBi positions have no hard limit)."""
    for name, table in module.named_modules():
        if isinstance(table, nn.Embedding) and POSITION_TABLE.search(name.rsplit(".", 1)[-1]):
            unused = getattr(table, "offset", 0) + (table.padding_idx + 1 if table.padding_idx is not None else 0)
            return table.num_embeddings - unused
    return None


AUTO_CLASS_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "speech-seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "zero-shot-image-classification": "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


def auto_class_names(task: str) -> dict[str, str]:
    """model_type -> class name transformers maps for ``task`` (a key of ``AUTO_CLASS_MAPPINGS``; the first class
    where it maps several)."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, AUTO_CLASS_MAPPINGS[task])
    return {t: c if isinstance(c, str) else c[0] for t, c in names.items()}


def zero3_loading(deepspeed_config: dict[str, Any]) -> object:
    """The object whose life makes ``from_pretrained`` partition weights as it creates them (ZeRO-3): transformers
    keeps a weak reference to it, so the caller keeps it alive while loading."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config)
