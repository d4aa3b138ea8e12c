"""The common name convention: each family's module names for the parts every transformer has.

A family maps common names to addressing specs (see :mod:`deltatune.addressing`); a method's default positions are
common names, so ``LoraModel(model)`` knows where ``q`` and ``v`` are in BERT, GPT-2, LLaMA or T5.  The names:

    q, k, v, o        attention projections (self- and, in encoder-decoders, cross-attention)
    attn              the attention sublayer (its input and output are the hidden state)
    attn_out          where a sequential adapter follows attention
    ffn_in, ffn_out   the feed-forward's first and last projection
    ffn               the feed-forward sublayer as one module (hidden state in and out), where the family has one
    ffn_in_block      the module whose input is the feed-forward's input (the parallel adapter reads it)
    ffn_block_out     where a sequential adapter follows the feed-forward
    ffn_parallel      the feed-forward module, where some have no linear ffn_out (MoE experts stored as fused
                      tensors): the parallel adapter reads its input and adds to its output
    norm              layer norms
    qkv               a fused q/k/v projection (GPT-2's ``c_attn``, ``query_key_value``, ``qkv_proj``)

Each method declares its default positions in these names (``default_positions`` on its class; the OpenDelta
paper's Table 1).  A default written ``"a|b"`` uses the first of the names the model has; a list of defaults, the first whose
names the model all has.  Where a model fuses q, k and v into one projection, a default naming some of them takes
the fused projection with ``qkv_slices`` (those features only, see :mod:`deltatune.methods.slices`), so LoRA's
"q, v" means the same on GPT-2 as on BERT.
"""

from __future__ import annotations

from torch import nn

from .families import FAMILIES
from .infer import describe, infer_common_names

QKV = ("q", "k", "v")

def family_of(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in FAMILIES else None


def common_names(model: nn.Module) -> tuple[str, dict[str, list[str]]]:
    """(where the names come from, the names): the family's file, or else inference from the structure."""
    family = family_of(model)
    if family is not None:
        return family, FAMILIES[family]
    inferred = infer_common_names(model)
    if inferred is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"no common-name mapping for {model_type!r} (mapped: {', '.join(sorted(FAMILIES))}) and inference found "
            f"{describe(model)}; pass modified_modules"
        )
    return f"inferred from the structure of {type(model).__name__}", inferred


Defaults = dict[str, list[str]] | list[dict[str, list[str]]]  # config fields in common names; a list: alternatives


def default_positions(defaults: Defaults | None, model: nn.Module, delta_type: str = "this method"
                      ) -> tuple[str, dict[str, list[str] | None]]:
    """(source, config fields) a method uses on ``model`` when the user names no modules: its ``defaults`` (the
    method class's ``default_positions``) as addressing specs, and ``qkv_slices`` where q, k or v are slices of a
    fused projection."""
    if not defaults:
        raise ValueError(f"{delta_type} has no default positions; pass modified_modules")
    source, names = common_names(model)
    alternatives = defaults if isinstance(defaults, list) else [defaults]

    def pick(wanted: str) -> list[str]:
        """"a|b": the first name the model has; q, k or v: also a fused projection (hybrid stacks have both)."""
        choices = wanted.split("|")
        found = [next((c for c in choices if names.get(c)), choices[-1])]
        return found + ["qkv"] if choices[-1] in QKV and names.get("qkv") else found

    fields = next((a for a in alternatives if all(any(names.get(c) for c in pick(w)) for ws in a.values()
                                                  for w in ws)), alternatives[-1])
    resolved: dict[str, list[str] | None] = {}
    slices = set()
    for field, wanted in fields.items():
        common = {w: [c for c in pick(w) if names.get(c)] for w in wanted}
        missing = [w for w, found in common.items() if not found] if field != "modified_modules" else []
        specs = list(dict.fromkeys(spec for found in common.values() for c in found for spec in names[c]))
        if missing or not specs:
            raise ValueError(f"{source} gives no {missing or wanted} for {delta_type}; pass modified_modules")
        resolved[field] = specs
        slices |= {w.split("|")[-1] for w, found in common.items() if "qkv" in found}
    if slices and slices != set(QKV):  # all three: the whole projection
        resolved["qkv_slices"] = [s for s in QKV if s in slices]
    return source, resolved
