"""The transformers model zoo at a tiny size: every model type transformers maps to a causal LM, a sequence
classifier (encoders), a sequence-to-sequence LM, a speech recogniser, an audio or image classifier or a zero-shot
image classifier (CLIP-style), built from its own config with the sizes shrunk.

Used by the zoo test and by ``python -m deltatune.zoo`` (the coverage table in docs/models.md).  A config is shrunk
by re-running its constructor with small values for the size fields it has, so fields derived from them (per-layer
type lists, head sizes) stay consistent; sub-configs (text, vision, audio) are shrunk the same way.  A vision
model with stages keeps them, one block each, with narrower widths (see ``_STAGE_WIDTHS``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import compat

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, VOCAB, EXPERTS = 32, 4, 2, 2, 64, 128, 4

# field -> tiny value; a field is set only when the default config has it.
_SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "embedding_size", "n_embed"), HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "num_encoder_layers", "depth"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_decoder_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), KV_HEADS),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size",
                     "expert_intermediate_size", "mlp_dim"), FFN),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "top_k", "moe_topk"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "v_head_dim", "qk_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim"), HIDDEN // HEADS),
    **dict.fromkeys(("pooler_hidden_size", "attention_hidden_size", "embedding_dim"), HIDDEN),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), HIDDEN // HEADS // 2),
    **dict.fromkeys(("n_group", "topk_group", "first_k_dense_replace", "num_dense_layers", "n_shared_experts",
                     "moe_num_shared_experts", "moe_layer_start_index"), 1),
    **dict.fromkeys(("linear_num_key_heads", "num_blocks"), KV_HEADS),
    "linear_num_value_heads": HEADS, "moe_k": 2, "moe_layer_end_index": LAYERS - 1,
}
# Per-stage lists of a vision model with stages (ResNet, Swin, PVT, ...): widths are divided by one power of two,
# so that channel counts keep chaining from stage to stage; heads become powers of two (they divide the widths);
# every stage keeps one block.
_STAGE_WIDTHS = ("hidden_sizes", "embed_dims", "embed_dim", "base_attn_unit_dims", "neck_hidden_sizes",
                 "stage_in_channels", "stage_mid_channels", "stage_out_channels", "in_channels", "out_channels")
_STAGE_HEADS = ("num_heads", "num_attention_heads")
_STAGE_DEPTHS = ("depths", "depth", "num_block_repeats", "n_attn_blocks", "stage_num_blocks")
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "depth")


@dataclass(frozen=True)
class ZooEntry:
    model_type: str
    task: str  # a key of compat.AUTO_CLASS_MAPPINGS
    class_name: str


_OTHER_MODALITIES = ("speech-seq2seq", "audio-classification", "image-classification", "zero-shot-image-classification")


def entries() -> list[ZooEntry]:
    """Every model type of the text, speech and image auto classes (encoders only for text classification),
    sorted."""
    causal, seq2seq = compat.auto_class_names("causal-lm"), compat.auto_class_names("seq2seq-lm")
    found = [ZooEntry(t, "causal-lm", c) for t, c in causal.items()]
    found += [ZooEntry(t, "seq2seq-lm", c) for t, c in seq2seq.items()]
    found += [ZooEntry(t, "sequence-classification", c)
              for t, c in compat.auto_class_names("sequence-classification").items()
              if t not in causal and t not in seq2seq]
    found += [ZooEntry(t, task, c) for task in _OTHER_MODALITIES for t, c in compat.auto_class_names(task).items()]
    return sorted(found, key=lambda e: (e.model_type, e.task))


def _shrunk(values: dict) -> dict:
    layers = next((values[k] for k in _LAYER_COUNTS if isinstance(values.get(k), int)), None)
    stages = next((len(values[k]) for k in _STAGE_DEPTHS if _int_list(values.get(k))), None)
    if layers == stages:  # the layer count counts stages, which are all kept: so are it and per-stage lists
        layers = None
    widths = [w for k in _STAGE_WIDTHS if _int_list(values.get(k)) for w in values[k]]
    scale = 1 << ((max(widths, default=1) - 1) // (8 * HIDDEN)).bit_length()  # the widest stage at most 8 × HIDDEN
    changes = {}
    for key, value in values.items():
        if _int_list(value) and key in _STAGE_WIDTHS:
            changes[key] = [max(1, w // scale) for w in value]
        elif _int_list(value) and key in _STAGE_HEADS:
            changes[key] = [1 << (h.bit_length() - 1) if h > 0 else h for h in value]
        elif _int_list(value) and key in _STAGE_DEPTHS:
            changes[key] = [min(d, 1) for d in value]
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool) and \
                not (key in _LAYER_COUNTS and value == stages):
            changes[key] = _SIZES[key]
        elif key == "vocab_size" and isinstance(value, int):
            changes[key] = VOCAB
        elif key.endswith("layer_types") and isinstance(value, list):  # one layer of each kind, in order
            kinds = list(dict.fromkeys(value))
            changes[key] = (kinds + value[len(kinds):])[:LAYERS] if len(kinds) <= LAYERS else None
        elif isinstance(value, list) and layers and len(value) == layers:  # a per-layer list
            changes[key] = value[:LAYERS]
        elif key.endswith("_layers") and _layer_indices(value, layers) and max(value) >= LAYERS:  # some layers
            changes[key] = _kept_indices(value, values.get("layer_types"))
        elif key == "conv_dim" and isinstance(value, list):  # a speech model's convolutional feature encoder
            changes[key] = [HIDDEN] * len(value)
        elif isinstance(value, dict) and "model_type" in value:  # a sub-config
            changes[key] = _shrunk(value)
    if "kv_lora_rank" in values and "num_key_value_heads" in values:  # latent attention: as many kv as q heads
        changes["num_key_value_heads"] = HEADS
    # A backbone's outputs name stages by number: left to the constructor, which picks them among the fewer kept.
    return {k: v for k, v in {**values, **changes}.items() if k not in ("out_features", "out_indices")}


def _int_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _layer_indices(value, layers: int | None) -> bool:
    return (isinstance(value, list) and bool(value) and layers is not None
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in value))


def _kept_indices(indices: list[int], layer_types: list | None) -> list[int]:
    """Indices of layers, for the tiny model, which keeps one layer of each kind in order (``layer_types`` above):
    each index becomes the kept layer of its layer's kind. Without kinds, the indices below the tiny count stay."""
    if not isinstance(layer_types, list):
        return [i for i in indices if i < LAYERS]
    first = {kind: i for i, kind in enumerate(dict.fromkeys(layer_types))}
    return sorted({first[layer_types[i]] for i in indices if i < len(layer_types) and first[layer_types[i]] < LAYERS})


def tiny_config(model_type: str):
    """The model type's default config with every size field it has made tiny."""
    from transformers import AutoConfig, CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    values = config_class().to_dict()
    shrunk = _shrunk(values)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "image_token_id", "image_token_index"):
        value = shrunk.get(key)
        if isinstance(value, int) and value >= VOCAB:
            shrunk[key] = min(value, VOCAB - 1) if key != "pad_token_id" else 0
    return AutoConfig.for_model(model_type, **{k: v for k, v in shrunk.items() if k != "model_type"})


def build(entry: ZooEntry, seed: int = 0) -> nn.Module:
    """The entry's model at a tiny size, float32, in eval mode (quietly: the zoo warns a lot)."""
    import transformers

    config = tiny_config(entry.model_type)
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            model = getattr(transformers, entry.class_name)(config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.float().eval()


DELTA_TYPES = ("lora", "adapter", "bitfit", "ia3", "prefix", "soft_prompt", "parallel_adapter", "compacter",
               "low_rank_adapter")


@dataclass(frozen=True)
class Outcome:
    status: str  # "works", "refused" (a clear error naming what is missing) or "failed" (anything else)
    detail: str = ""


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output[0]


def _raised_here(error: BaseException) -> bool:
    """A refusal is an error deltatune raises itself, naming what is missing; anything raised deeper is a crash."""
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).is_relative_to(Path(__file__).parent)


def check(entry: ZooEntry, delta_type: str, folder: str) -> Outcome:
    """Attach ``delta_type`` with its defaults, and check: its trainable tensors change the output, a save loaded
    onto a fresh copy reproduces it, detaching restores the bare output bit-exactly."""
    from .auto import AutoDeltaModel
    from .probe import pseudo_inputs

    model = build(entry)
    inputs = pseudo_inputs(model)
    bare = _logits(model, inputs)
    try:
        # Tiny backbones are smaller than some deltas' default sizes: the check is about structure, not budget.
        delta = AutoDeltaModel.from_config({"delta_type": delta_type}, model, allow_larger_than_backbone=True)
    except (ValueError, TypeError, RuntimeError) as error:
        if not _raised_here(error):
            raise
        return Outcome("refused", str(error).split("\n")[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    tuned = _logits(model, inputs)
    if not torch.isfinite(tuned).all() or torch.equal(tuned, bare):
        return Outcome("failed", "the trainable tensors do not change the output")
    delta.save_finetuned(folder)
    fresh = build(entry)
    AutoDeltaModel.from_finetuned(folder, fresh, allow_larger_than_backbone=True)
    if not torch.allclose(_logits(fresh, inputs), tuned, atol=1e-5, rtol=1e-4):
        return Outcome("failed", "the checkpoint loaded onto a fresh copy does not reproduce the output")
    delta.detach()
    if not torch.equal(_logits(model, inputs), bare):
        return Outcome("failed", "detach does not restore the bare output")
    return Outcome("works")


MAX_PARAMETERS = 3_000_000  # larger after shrinking: a part the shrinker does not reach (a vision or audio tower)


def skip_reason(entry: ZooEntry) -> str | None:
    """Why the entry cannot be checked at a tiny size (transformers cannot build or run it so), or None."""
    from .probe import pseudo_inputs

    def first_line(error: BaseException) -> str:
        error = error.__cause__ or error  # a validator's wrapper says only which validator failed
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:120]}"

    try:
        model = build(entry)
    except Exception as error:
        return f"transformers cannot build it tiny ({first_line(error)})"
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        return f"not tiny after shrinking ({size:,} parameters)"
    try:
        _logits(model, pseudo_inputs(model))
    except Exception as error:
        return f"transformers cannot run it tiny on its pseudo input ({first_line(error)})"
    return None


def table(results: dict[ZooEntry, dict[str, Outcome] | str]) -> str:
    """The coverage table (Markdown): one row per entry, one column per delta type."""
    import transformers

    checked = [o for r in results.values() if isinstance(r, dict) for o in r.values()]
    works = sum(o.status == "works" for o in checked)
    mark = {"works": "✓", "refused": "refused", "failed": "**FAILED**", "crashed": "**CRASHED**"}
    lines = [
        f"transformers {transformers.__version__}: {len(results)} model classes, "
        f"{sum(isinstance(r, dict) for r in results.values())} checked at a tiny size; "
        f"{works} of {len(checked)} (model × delta type) combinations work with defaults "
        f"({100 * works / max(len(checked), 1):.1f}%), {sum(o.status == 'refused' for o in checked)} are refused "
        f"with a message, {sum(o.status in ('failed', 'crashed') for o in checked)} fail.",
        "",
        "| model type | class | " + " | ".join(DELTA_TYPES) + " |",
        "|---|---|" + "---|" * len(DELTA_TYPES),
    ]
    notes = []
    for entry, result in results.items():
        if isinstance(result, str):
            lines.append(f"| {entry.model_type} | {entry.class_name} | skipped: {result} |" + " |" * 8)
            continue
        cells = []
        for delta_type in DELTA_TYPES:
            outcome = result[delta_type]
            cells.append(mark[outcome.status] + (f" [{len(notes) + 1}]" if outcome.detail else ""))
            if outcome.detail:
                notes.append(f"{len(notes) + 1}. {entry.model_type} / {delta_type}: {outcome.detail}")
        lines.append(f"| {entry.model_type} | {entry.class_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *notes, ""])


def run(outcome_of=None) -> dict[ZooEntry, dict[str, Outcome] | str]:
    import tempfile

    results: dict[ZooEntry, dict[str, Outcome] | str] = {}
    for entry in entries():
        reason = skip_reason(entry)
        if reason:
            results[entry] = reason
            continue
        results[entry] = {}
        for delta_type in DELTA_TYPES:
            with tempfile.TemporaryDirectory() as folder:
                try:
                    outcome = check(entry, delta_type, folder)
                except Exception as error:
                    outcome = Outcome("crashed", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
            results[entry][delta_type] = outcome
            print(f"{entry.model_type:28} {delta_type:17} {outcome.status:8} {outcome.detail[:100]}", flush=True)
    return results


if __name__ == "__main__":  # python -m deltatune.zoo docs/models.md
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/models.md")
    body = table(run())
    header = (target.read_text().split("<!-- table -->")[0] if target.exists() else "# Models\n\n") + "<!-- table -->\n"
    target.write_text(header + body)
