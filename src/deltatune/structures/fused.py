"""Where q, k and v sit in the output of a fused q/k/v projection (GPT-2's ``c_attn``, GPT-NeoX's
``query_key_value``, Phi-3's ``qkv_proj``, ...), so a method can adapt some of them only.

Each model splits the fused output its own way, and only its attention code says how; a wrong guess would adapt the
wrong features without any error.  So the layouts are written out per attention class (checked against the model's
own attention in tests/test_fused_qkv.py) and an unknown fused projection is refused, not guessed.  A layout is a
number of equal groups, each a sequence of ``(role, width)`` segments:

    contiguous   [q | k | v]                         GPT-2, MPT, ModernBERT, Phi-3, Ergo (k, v narrower under GQA)
    per head     [q₁ k₁ v₁ | q₂ k₂ v₂ | ...]          BLOOM, GPT-NeoX, Persimmon, Falcon-RW, DeBERTa, ...
    per kv group [q q .. k v | q q .. k v | ...]      Falcon with its new decoder architecture
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Segments = tuple[int, list[tuple[str, int]]]  # (groups, [(role, width), ...] in each group)


def _head_dim(attention: nn.Module) -> int:
    names = ("head_dim", "head_size", "attention_head_size")
    return next(getattr(attention, a) for a in names if hasattr(attention, a))


def _thirds(attention: nn.Module, out: int) -> Segments:
    return 1, [("q", out // 3), ("k", out // 3), ("v", out // 3)]


def _per_head(attention: nn.Module, out: int) -> Segments:
    d = _head_dim(attention)
    return out // (3 * d), [("q", d), ("k", d), ("v", d)]


def _query_first(query: int) -> Callable[[int], Segments]:
    """[q | k | v] with q ``query`` wide and k, v sharing the rest (grouped- or multi-query attention)."""
    return lambda out: (1, [("q", query), ("k", (out - query) // 2), ("v", (out - query) // 2)])


def _phi3(attention: nn.Module, out: int) -> Segments:
    return _query_first(attention.config.num_attention_heads * attention.head_dim)(out)


def _gpt2(attention: nn.Module, out: int) -> Segments:
    if getattr(attention, "is_cross_attention", False):  # c_attn projects the encoder states to k and v only
        return 1, [("k", out // 2), ("v", out // 2)]
    return _thirds(attention, out)


def _gpt_bigcode(attention: nn.Module, out: int) -> Segments:
    if attention.multi_query:
        return _query_first(attention.embed_dim)(out)
    return _per_head(attention, out)


def _falcon(attention: nn.Module, out: int) -> Segments:
    d = attention.head_dim
    if attention.new_decoder_architecture:
        per_group = attention.num_heads // attention.num_kv_heads
        return attention.num_kv_heads, [("q", per_group * d), ("k", d), ("v", d)]
    if attention.multi_query:
        return _query_first(attention.num_heads * d)(out)
    return _per_head(attention, out)


def _codegen(attention: nn.Module, out: int) -> Segments:
    groups = getattr(attention, "mp_num", 4)  # model-parallel chunks, each [q | v | k]; 5.0 hard-codes 4
    width = out // (3 * groups)
    return groups, [("q", width), ("v", width), ("k", width)]


# (module of the attention class, attention class, attribute of the fused projection) -> layout
LAYOUTS: dict[tuple[str, str, str], Callable[[nn.Module, int], Segments]] = {
    ("modeling_gpt2", "GPT2Attention", "c_attn"): _gpt2,
    ("modeling_openai", "Attention", "c_attn"): _thirds,
    ("modeling_mpt", "MptAttention", "Wqkv"): _thirds,
    ("modeling_modernbert", "ModernBertAttention", "Wqkv"): _thirds,
    ("modeling_phi3", "Phi3Attention", "qkv_proj"): _phi3,
    ("modeling_phi4_multimodal", "Phi4MultimodalAttention", "qkv_proj"): _phi3,
    ("modeling_ergo", "ErgoAttention", "qkv_proj"): _phi3,
    ("modeling_gpt_bigcode", "GPTBigCodeAttention", "c_attn"): _gpt_bigcode,
    ("modeling_falcon", "FalconAttention", "query_key_value"): _falcon,
    ("modeling_bloom", "BloomAttention", "query_key_value"): _per_head,
    ("modeling_gpt_neox", "GPTNeoXAttention", "query_key_value"): _per_head,
    ("modeling_gpt_neox_japanese", "GPTNeoXJapaneseAttention", "query_key_value"): _per_head,
    ("modeling_persimmon", "PersimmonAttention", "query_key_value"): _per_head,
    ("modeling_deberta", "DisentangledSelfAttention", "in_proj"): _per_head,
    ("modeling_minimax", "MiniMaxLightningAttention", "qkv_proj"): _per_head,
    ("modeling_codegen", "CodeGenAttention", "qkv_proj"): _codegen,
}


def _key(attention: nn.Module, attribute: str) -> tuple[str, str, str]:
    cls = type(attention)
    return cls.__module__.rsplit(".", 1)[-1], cls.__name__, attribute


def known_layouts() -> list[str]:
    return [f"{cls}.{attribute}" for _, cls, attribute in LAYOUTS]


def qkv_rows(model: nn.Module, position: str, out_features: int) -> dict[str, torch.Tensor] | None:
    """For a fused q/k/v projection at ``position`` with a known layout, the output features of each of q, k and v
    (sorted index tensors); None for any other module."""
    parent, _, attribute = position.rpartition(".")
    attention = model.get_submodule(parent) if parent else model
    layout = LAYOUTS.get(_key(attention, attribute))
    if layout is None:
        return None
    groups, segments = layout(attention, out_features)
    width = sum(w for _, w in segments)
    if groups * width != out_features or any(w <= 0 for _, w in segments):
        raise ValueError(f"{position} has {out_features} output features, which does not fit the layout of "
                         f"{type(attention).__name__}.{attribute} ({groups} × {segments})")
    rows, offset = {}, 0
    starts = torch.arange(groups)[:, None] * width
    for role, size in segments:
        rows[role] = (starts + offset + torch.arange(size)).flatten()
        offset += size
    return rows
