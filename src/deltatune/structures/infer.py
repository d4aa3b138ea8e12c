"""Common names for a model no family file maps, inferred from its structure.

Stacks are the ``ModuleList``s of one repeated block class, or of layer/block classes (hybrid models mix attention,
state-space and MoE layers), where a block holds an attention module (a submodule whose name or class says
``att``); lists inside another stack's blocks (MoE experts) and towers of other modalities (names with vision,
image, audio, speech, ...) are left out, so the defaults cover the language stacks: the decoder of a
causal LM, the encoder and decoder of an encoder-decoder.  A model with no list of blocks outside its towers (an
audio or image classifier) gets the towers' stacks.  In every block (they can differ: dense and MoE layers):

- attention projections by role, first by name (a wide vocabulary, below), then by wiring: the three linear layers
  that read the hidden size inside the attention module are q, k, v in order (any output size: grouped-query attention
  projects k and v to fewer heads), one alone is a fused q/k/v projection, and the last one that writes the hidden
  size is o;
- the feed-forward's linear layers outside attention, by name (gated MLPs: gate/up in, down out) or else by shape
  (reads the hidden size: in; writes it: out); routers are left out.  MoE experts that are ``nn.Linear`` modules
  are ffn_in/ffn_out like any MLP; experts stored as fused 3-D tensors are not linear layers, so methods on
  ffn_in/ffn_out do not reach them (their MoE block is still ``ffn`` for adapters);
- the feed-forward module (the common parent of its linear layers), the first attention module (adapters after
  attention), and the norms outside attention.

:func:`describe` says what was found and what is missing when inference is unsure.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..addressing import DELTA_SLOT
from ..compat import Conv1D

TOWER = re.compile(r"vision|visual|image|audio|speech|acoustic|video|patch|vit\b|perceiver_resampler", re.IGNORECASE)
ATTENTION = re.compile(r"att", re.IGNORECASE)
_NAMES = {  # last name part -> role
    "qkv": r"qkv|qkv_proj|query_key_value|c_attn|wqkv|w_pack|qkv_linear|in_proj",
    "q": r"q|query|q_proj|q_lin|wq|to_q|query_proj|q_b_proj|c_q",
    "k": r"k|key|k_proj|k_lin|wk|to_k|key_proj|c_k",
    "v": r"v|value|v_proj|v_lin|wv|to_v|value_proj|c_v|kv_b_proj|kv_proj|to_kv",
    "o": r"o|out|o_proj|out_proj|out_lin|wo|to_out|dense|c_proj|proj|output|dense_out|attn_out",
    "ffn_in": r"fc1|fc_in|wi|wi_0|wi_1|w1|w3|gate_proj|up_proj|gate_up_proj|c_fc|dense_h_to_4h|lin1|up|w_in|"
              r"linear_1|ff_in|intermediate_dense|dense_in",
    "ffn_out": r"fc2|fc_out|wo|w2|down_proj|c_proj|dense_4h_to_h|lin2|down|w_out|linear_2|ff_out|output_dense|"
               r"dense_out",
    "router": r"router|gate|.*_gate|gating|w_gate|classifier",
}
_ROLE = {role: re.compile(pattern, re.IGNORECASE) for role, pattern in _NAMES.items()}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _shape(linear: nn.Module) -> tuple[int, int]:
    """(in, out)."""
    return tuple(linear.weight.shape) if isinstance(linear, Conv1D) else tuple(linear.weight.shape[::-1])


def _own(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if n and DELTA_SLOT not in n.split(".")}


def _attention_modules(block: nn.Module) -> list[str]:
    """Outermost submodules named or typed as attention that hold linear layers, in order."""
    found: list[str] = []
    for name, module in _own(block).items():
        if any(name.startswith(f + ".") for f in found):
            continue
        if (ATTENTION.search(name.rsplit(".", 1)[-1]) or ATTENTION.search(type(module).__name__)) and \
                not AUXILIARY.search(type(module).__name__) and any(_is_linear(m) for m in module.modules()):
            found.append(name)
    return found


def _blocks(module: nn.Module) -> bool:
    """A list of one repeated block class, or of layer/block classes (hybrid stacks: attention, SSM, MoE layers)."""
    kinds = {type(c) for c in module}
    return len(kinds) == 1 or all(re.search(r"(layer|block)$", k.__name__, re.IGNORECASE) for k in kinds)


def stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The language stacks: lists of blocks, one at least with attention, not inside another stack; in a model with
    no list of blocks outside its towers (a vision or audio model: the tower is all there is), the towers' stacks.
    A multimodal model whose language blocks have no attention (state-space) gets none: not its vision tower."""
    found: list[tuple[str, nn.ModuleList]] = []
    towers: list[tuple[str, nn.ModuleList]] = []
    language_blocks = False
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or not _blocks(module):
            continue
        if all(isinstance(block, nn.ModuleList) for block in module):  # a list of stacks (Funnel): each one
            continue
        if DELTA_SLOT in name.split(".") or any(name.startswith(f + ".") for f, _ in found + towers):
            continue
        tower = bool(TOWER.search(name))
        language_blocks |= not tower
        if any(_attention_modules(block) for block in module):
            (towers if tower else found).append((name, module))
    return found if found or language_blocks else towers


def _hidden_size(block: nn.Module) -> int | None:
    reads = Counter(_shape(m)[0] for m in _own(block).values() if _is_linear(m))
    return reads.most_common(1)[0][0] if reads else None


def _role(name: str, *roles: str) -> str | None:
    last = name.rsplit(".", 1)[-1].replace("-", "_")
    if re.fullmatch(r"\d+|linear", last) and name.count("."):  # inside a list (to_out.0) or a wrapper (q_proj.linear)
        last = name.rsplit(".", 2)[-2]
    return next((r for r in roles if _ROLE[r].fullmatch(last)), None)


def _attention_roles(attention: str, linears: dict[str, nn.Module], hidden: int) -> dict[str, list[str]]:
    inside = {n: m for n, m in linears.items() if n.startswith(attention + ".")}
    roles: dict[str, list[str]] = {}
    for name in inside:
        role = _role(name, "qkv", "q", "k", "v", "o")
        if role and role not in roles:
            roles[role] = [name]
    if not roles.keys() & {"q", "k", "v", "qkv"}:  # by wiring: the projections reading the hidden state
        reading = [n for n, m in inside.items() if _shape(m)[0] == hidden and n not in roles.get("o", [])]
        if len(reading) == 1:
            roles = {"qkv": reading}
        elif len(reading) == 3:  # more (gates, indexers, low-rank parts): unsure, so none
            roles = dict(zip("qkv", ([n] for n in reading)))
    taken = {n for names in roles.values() for n in names}
    if "o" not in roles:
        writing = [n for n, m in inside.items() if _shape(m)[1] == hidden and n not in taken]
        if writing:
            roles["o"] = writing[-1:]
    return roles


# Modules whose linear layers are neither attention projections nor a feed-forward: gated norms' small MLPs, the
# token-selecting indexer of sparse attention (DeepSeek-V3.2 style)
AUXILIARY = re.compile(r"(norm|indexer)$", re.IGNORECASE)  # by class name: RobertaPreLayerNormAttention is attention


def _block_roles(block: nn.Module) -> dict[str, list[str]]:
    own = _own(block)
    auxiliary = [n for n, m in own.items() if AUXILIARY.search(type(m).__name__)]
    linears = {n: m for n, m in own.items()
               if _is_linear(m) and not any(n.startswith(a + ".") for a in auxiliary)}
    hidden = _hidden_size(block)
    attentions = _attention_modules(block)
    names: dict[str, list[str]] = {}
    for attention in attentions:
        for role, found in _attention_roles(attention, linears, hidden).items():
            names.setdefault(role, []).extend(found)
    names["attn"] = names["attn_out"] = attentions[:1]
    outside = {n: m for n, m in linears.items() if not any(n.startswith(a + ".") for a in attentions)}
    mixers = [n for n, m in block.named_children() if any(isinstance(c, nn.Conv1d) for c in m.modules())]
    for name, linear in outside.items():
        role = _role(name, "ffn_in", "ffn_out", "router")
        # Unnamed: by shape, except in a state-space or convolution mixer (its in_proj and out_proj are no
        # feed-forward); a projection neither reading nor writing the hidden size is skipped.
        if role is None and not any(name.startswith(m + ".") for m in mixers):
            read, write = _shape(linear)
            role = "ffn_in" if read == hidden and write > hidden else "ffn_out" if write == hidden else None
        if role in ("ffn_in", "ffn_out"):
            names.setdefault(role, []).append(name)
    ffn = _feed_forward(block, attentions, names.get("ffn_in", []) + names.get("ffn_out", []))
    if ffn:
        names["ffn"] = names["ffn_in_block"] = names["ffn_block_out"] = [ffn]
        outs = [n for n in names.get("ffn_out", []) if n.startswith(ffn + ".")]
        if [n.rsplit(".", 1)[0] for n in outs] != [ffn]:  # a MoE block: routed, shared or fused experts
            names["ffn_parallel"] = [ffn]
    elif names.get("ffn_in") and names.get("ffn_out"):  # inline feed-forward (fc1 and fc2 directly in the block)
        names["ffn_in_block"], names["ffn_block_out"] = names["ffn_in"][:1], names["ffn_out"][-1:]
    names["norm"] = [n for n, m in own.items() if "norm" in type(m).__name__.lower()
                     and not any(n.startswith(a + ".") for a in attentions) and not list(m.children())]
    return {role: found for role, found in names.items() if found}


FEED_FORWARD = re.compile(r"mlp|moe|ffn|feed_?forward|experts?|block_sparse_moe", re.IGNORECASE)


def _sublayers(block: nn.Module, attentions: list[str]) -> dict[str, nn.Module]:
    """The block's children other than attention and norms; in a list it holds (T5's ``layer.N``), the children
    of each layer."""
    found: dict[str, nn.Module] = {}
    for name, child in block.named_children():
        if isinstance(child, nn.ModuleList):
            found.update({f"{name}.{i}.{n}": m for i, layer in enumerate(child) for n, m in layer.named_children()})
        else:
            found[name] = child
    return {n: m for n, m in found.items() if not AUXILIARY.search(type(m).__name__)
            and not any(n == a or n.startswith(a + ".") or a.startswith(n + ".") for a in attentions)}


def _feed_forward(block: nn.Module, attentions: list[str], linears: list[str]) -> str | None:
    """The block's sublayer that holds every feed-forward linear layer, or else the one named as a feed-forward (a
    MoE block whose experts are fused tensors); None for inline layers."""
    children = _sublayers(block, attentions)
    if linears:
        return next((c for c in children if all(n.startswith(c + ".") for n in linears)), None)
    named = [c for c in children if FEED_FORWARD.fullmatch(c.rsplit(".", 1)[-1])]
    named = named or [c for c in children if FEED_FORWARD.search(c.rsplit(".", 1)[-1])]
    return named[0] if len(named) == 1 else None


def infer_common_names(model: nn.Module) -> dict[str, list[str]] | None:
    """Common names -> addressing specs (regexes anchored at each stack), or None without any stack."""
    found = stacks(model)
    if not found:
        return None
    specs: dict[str, list[str]] = {}
    for list_name, blocks in found:
        prefix = re.escape(list_name) + r"\.\d+\."
        relative: dict[str, list[str]] = {}
        for block in blocks:
            for role, names in _block_roles(block).items():
                relative.setdefault(role, [])
                relative[role] += [n for n in names if n not in relative[role]]
        if "ffn_parallel" in relative:  # one MoE layer makes the parallel adapter wrap every feed-forward module
            relative["ffn_parallel"] = relative["ffn"]
        for role, names in relative.items():
            specs.setdefault(role, []).extend(f"[r]{prefix}{re.escape(n)}" for n in names)
    return specs


def describe(model: nn.Module) -> str:
    """What inference found, for error messages."""
    found = stacks(model)
    if not found:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        return f"no stack of repeated blocks with an attention module (module lists: {lists[:5] or 'none'})"
    names = infer_common_names(model) or {}
    return f"stacks {[n for n, _ in found]} with common names {sorted(names)}"


def looks_fused(name: str) -> bool:
    """Whether a module's name says it is a fused q/k/v projection (``c_attn``, ``query_key_value``, ...)."""
    return _role(name, "qkv") == "qkv"
