"""LoRA checkpoints in PEFT's format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a tensor ``base_model.model.<module>.lora_A.weight`` (``lora_B.weight``; ``lora_magnitude_vector`` for
DoRA; ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), with the same shapes and the same formula as
:class:`~deltatune.LoraModel`, so the numbers move across unchanged.  Backbone modules trained whole (a
classification head) are PEFT's ``modules_to_save``: saved as ``base_model.model.<module>.<parameter>``, a trained
copy of the module while the rest of the model stays as it was.  LoRA on fused MoE expert weights is PEFT's
``target_parameters`` (:mod:`deltatune.peft_experts`).  Per-module ranks and alphas (``rank_pattern``,
``alpha_pattern``) are :class:`~deltatune.LoraConfig`'s own.  PEFT features with no LoRA counterpart here (``bias``
other than ``"none"``, layer replication) are refused, not dropped; so are adapters whose initialisation rewrote
the base weights (PiSSA, OLoRA, CorDA, LoftQ), which are only right on those rewritten weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, peft_experts, pooling
from .addressing import DELTA_SLOT, REGEX_PREFIX, first_match
from .base import refuse_apart_attached, refuse_missing_parameters
from .compat import Conv1D
from .methods.lora import LoraModel
from .methods.lora_conv import CONVOLUTIONS
from .methods.lora_experts import LoraExpertsLayer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_NAMES = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _peft_name(layer: nn.Module, name: str) -> str:
    return (_EMBEDDING_NAMES if layer.embedding else _NAMES)[name]


def export_peft(delta: LoraModel, save_directory: str | os.PathLike) -> Path:
    """Write ``delta`` so that ``peft.PeftModel.from_pretrained(backbone, save_directory)`` loads it; backbone
    modules trained with it (a classification head) go into PEFT's ``modules_to_save``."""
    if not isinstance(delta, LoraModel):
        raise TypeError(f"only LoRA deltas have a PEFT format, not {type(delta).__name__}")
    config = delta.config
    if config.qkv_slices:
        raise ValueError(f"the delta adapts the {config.qkv_slices} slices of fused q/k/v projections, which PEFT's "
                         "LoRA cannot express (it adapts a module whole); use save_finetuned, or build the delta "
                         "with qkv_slices=None")
    _refuse_mean_pooling(delta.backbone_model, "the delta was trained on", "save it with save_finetuned instead")
    _refuse_dilated(delta)
    experts = [p for p, layer in delta.deltas.items() if isinstance(layer, LoraExpertsLayer)]
    if any(delta.rank_and_alpha[p] != (config.lora_r, config.lora_alpha) for p in experts):
        raise ValueError("the delta gives fused expert weights a rank or alpha of their own, which PEFT matches "
                         "against parameter names (target_parameters), not modules; use save_finetuned")
    modules, tied = _modules_to_save(delta)
    tensors, targets = peft_experts.write(delta, PREFIX)
    for key, tensor in delta.delta_state_dict().items():  # deltas.<position>.<name>, backbone.<parameter>
        kind, _, rest = key.partition(".")
        if kind == "backbone":
            tensors[PREFIX + rest] = tensor
        elif not rest.startswith(tuple(f"{p}.lora_" for p in experts)):  # written above
            position, _, name = rest.rpartition(".")
            tensors[f"{PREFIX}{position}.{_peft_name(delta.deltas[position], name)}"] = tensor
    tensors.update({PREFIX + alias: tensors[PREFIX + name] for alias, name in tied.items()})  # PEFT saves both
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, **_base_model(delta.backbone_model),
        "r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "rank_pattern": _peft_pattern(delta, config.rank_pattern, 0),
        "alpha_pattern": _peft_pattern(delta, config.alpha_pattern, 1),
        "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none",
        "target_modules": [p for p in delta.positions if p not in experts], "target_parameters": targets or None,
        "modules_to_save": modules or None,
        "fan_in_fan_out": any(isinstance(host, Conv1D) for host in delta._hosts.values()),
        **({"ensure_weight_tying": True} if tied else {}),
    }
    return checkpoint.write(save_directory, peft_config, tensors, CONFIG_FILE, WEIGHTS_FILE, paired=False)


def _base_model(backbone: nn.Module) -> dict:
    """Where PEFT's ``AutoPeftModel.from_pretrained(folder)`` finds the backbone, written as PEFT writes it: the
    folder or hub id the backbone was loaded from (None for one built from a config) and its class."""
    return {"base_model_name_or_path": getattr(backbone, "name_or_path", None) or None,
            "auto_mapping": {"base_model_class": type(backbone).__name__,
                             "parent_library": type(backbone).__module__}}


def _refuse_dilated(delta: LoraModel) -> None:
    """PEFT's LoRA on a convolution convolves with the host's kernel, stride and padding but not its dilation, so on
    a dilated convolution it computes another update (or none that fits)."""
    dilated = [p for p, host in delta._hosts.items() if isinstance(host, CONVOLUTIONS) and max(host.dilation) > 1]
    if dilated:
        raise ValueError(f"{dilated[:3]} are dilated convolutions, on which PEFT's LoRA leaves out the dilation and "
                         "computes another update than deltatune's: a LoRA on them does not cross between the formats")


def _refuse_mean_pooling(backbone: nn.Module, role: str, remedy: str) -> None:
    """PEFT's format records no pooling: a PEFT model's classifier reads its own pooler, so a delta moved across
    with a backbone that pools by the tokens' mean (deltatune.pooling) would give other logits there."""
    if pooling.of(backbone) == "mean":
        raise ValueError(f"{role} a backbone whose classifier pools by the tokens' mean (deltatune.pooling), which "
                         f"PEFT's format cannot record: PEFT's model reads its own pooler and would compute other "
                         f"logits; {remedy}")


def _modules_to_save(delta: LoraModel) -> tuple[list[str], dict[str, str]]:
    """The backbone modules whose parameters ``delta`` saves beside it, refused unless PEFT's ``modules_to_save``
    (a trained copy of each whole module, the rest of the model as it was) gives the same model; and the tied
    output embedding of a trained input embedding -> its weight's name, which PEFT's ``ensure_weight_tying`` keeps
    tied to the copy."""
    names = [*delta.unfrozen_backbone, *delta.backbone_apart]
    owners = list(dict.fromkeys(name.rpartition(".")[0] for name in names))
    modules = [m for m in owners if not any(m.startswith(o + ".") for o in owners)]
    backbone, saved = delta.backbone_model, set(names)
    problems = []
    for module in modules:
        own = {f"{module}.{k}" for k, _ in backbone.get_submodule(module).named_parameters()
               if DELTA_SLOT not in k.split(".")}
        if own - saved:
            problems.append(f"{module} is trained only in part ({sorted(own & saved)}, not {sorted(own - saved)})")
        adapted = [p for p in delta.positions if _nested(p, module)]
        if adapted:
            problems.append(f"{module} is trained whole and also adapted by LoRA at {adapted[:3]}")
    tied = _tied(backbone, delta.unfrozen_backbone)
    embeddings = _tied_embeddings(backbone)
    problems += [f"{name} is tied to {others}, which PEFT's copy of {name.rpartition('.')[0]} would leave as they "
                 "were" for name, others in tied.items() if embeddings.get(name) != others]
    if problems:
        raise ValueError(f"the delta trains backbone parameters that PEFT's modules_to_save cannot hold: "
                         f"{'; '.join(problems)}. Use save_finetuned.")
    return modules, {others[0]: name for name, others in tied.items()}


def _tied_embeddings(backbone: nn.Module) -> dict[str, list[str]]:
    """``{input embedding weight: [output embedding weight]}`` when the model ties the two, else ``{}``."""
    try:
        pair = backbone.get_input_embeddings(), backbone.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return {}
    names = {id(module): name for name, module in backbone.named_modules(remove_duplicate=False)}
    if None in pair or any(id(m) not in names for m in pair) or pair[0].weight is not pair[1].weight:
        return {}
    return {f"{names[id(pair[0])]}.weight": [f"{names[id(pair[1])]}.weight"]}


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _tied(backbone: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each of ``names``, the other parameter names of the same tensor outside ``names`` (tied weights)."""
    parameters = dict(backbone.named_parameters(remove_duplicate=False))
    tied = {name: [n for n, p in parameters.items() if p is parameters[name] and n not in names] for name in names}
    return {name: others for name, others in tied.items() if others}


def _refuse_unsupported(config: dict, folder: Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is read")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained biases)")
    # Layer selection (layers_to_transform) needs nothing: the positions come from the tensors saved.
    for key in ("layer_replication", "lora_bias", "trainable_token_indices", "use_qalora"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    if config.get("target_parameters") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        problems.append("rank_pattern/alpha_pattern with target_parameters (PEFT matches them against parameter "
                        "names there)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS) or config.get("loftq_config"):
        # These inits rewrite the base weights when the adapter is made: on the original weights it is wrong.
        problems.append(f"init_lora_weights={init!r} changed the base model's weights, so the adapter is only right "
                        "on those; convert it in PEFT first (save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...)) and import the converted adapter")
    if problems:
        raise ValueError(f"{folder / CONFIG_FILE} uses PEFT features deltatune does not import: {'; '.join(problems)}")


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                 "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def backbone_class(folder: Path) -> str:
    """The transformers class an adapter was made on: the class PEFT records (``auto_mapping``) or its task's."""
    config = read_config(folder)
    mapping = config.get("auto_mapping") or {}
    if str(mapping.get("parent_library", "")).startswith("transformers") and mapping.get("base_model_class"):
        return mapping["base_model_class"]
    if config.get("task_type") in _TASK_CLASSES:
        return _TASK_CLASSES[config["task_type"]]
    raise ValueError(f"{folder / CONFIG_FILE} names neither a transformers class (auto_mapping) nor a task type "
                     f"({', '.join(_TASK_CLASSES)}), so the backbone's class is unknown")


def read_config(folder: Path) -> dict:
    """A PEFT adapter folder's config, refused if it uses what deltatune does not import (anything but LoRA...)."""
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter: {CONFIG_FILE} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text())
    _refuse_unsupported(config, folder)
    return config


def from_peft(peft_model_path: str | os.PathLike, backbone_model: nn.Module, *, attach: bool = True,
              name: str | None = None, keep_backbone_apart: bool = False) -> LoraModel:
    """Import a PEFT LoRA adapter onto ``backbone_model`` as a :class:`LoraModel` (attached unless ``attach=False``).

    The modules it trained whole (``modules_to_save``, e.g. the classification head of a ``SEQ_CLS`` adapter) are
    written into the backbone, as :meth:`DeltaBase.from_finetuned` does with a head saved by deltatune, or with
    ``keep_backbone_apart=True`` (and ``attach=False``) kept as the delta's own, for a :class:`~deltatune.DeltaBank`.
    """
    folder = Path(peft_model_path)
    config = read_config(folder)
    refuse_apart_attached(keep_backbone_apart, attach)
    _refuse_mean_pooling(backbone_model, "the adapter would be imported onto",
                         "load the backbone with pooling='model', as PEFT trained it")
    source = folder / WEIGHTS_FILE
    tensors, expert_tensors, experts = peft_experts.read(adapter_tensors(folder), lora_position, backbone_model,
                                                         source)
    lora = {k: lora_position(k) for k in tensors}
    heads = [k for k, position in lora.items() if position is None]
    _refuse_unexplained({k: tensors[k] for k in heads}, config.get("modules_to_save") or [], backbone_model, source,
                        check_ties=not keep_backbone_apart)
    parameters = [n for n, _ in backbone_model.named_parameters(remove_duplicate=False)]
    heads.sort(key=parameters.index)  # the backbone's order, as a head saved by deltatune lists them
    order = [name for name, _ in backbone_model.named_modules()]
    found = {p for p in lora.values() if p is not None} | set(experts)
    positions = sorted(found, key=lambda p: order.index(p) if p in order else -1)
    delta = LoraModel(
        backbone_model, positions=positions, attach=False, lora_r=config["r"], lora_alpha=config["lora_alpha"],
        rank_pattern=_deciding(config.get("rank_pattern"), positions),
        alpha_pattern=_deciding(config.get("alpha_pattern"), positions), lora_dropout=config.get("lora_dropout", 0.0),
        use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora", False), name=name,
    )
    _refuse_dilated(delta)
    ours = {f"{p}.{_peft_name(layer, n)}": f"deltas.{p}.{n}"
            for p, layer in delta.deltas.items() if p not in experts for n in layer.state_dict()}
    renamed = {ours.get(k, k if lora[k] else f"backbone.{k}"): t for k, t in tensors.items()} | expert_tensors
    delta.load_saved(renamed, heads, source, apart=keep_backbone_apart)
    return delta.attach() if attach else delta


def _peft_pattern(delta: LoraModel, pattern: dict, which: int) -> dict:
    """Our rank_pattern / alpha_pattern as PEFT's: its keys are regexes matched as ours are (at the end of a name,
    at a dot), the first that matches wins.  PEFT sorts the keys when it saves a config again, so where two keys
    match one position, each position's value is written under its own full name, which no reordering changes."""
    if all(sum(first_match([spec], p) is not None for spec in pattern) <= 1 for p in delta.positions):
        return {spec[len(REGEX_PREFIX):] if spec.startswith(REGEX_PREFIX) else re.escape(spec): value
                for spec, value in pattern.items()}
    decided = [p for p in delta.positions if first_match(pattern, p) is not None]
    return {f"^{re.escape(p)}": delta.rank_and_alpha[p][which] for p in decided}


def _deciding(pattern: dict | None, positions: list[str]) -> dict:
    """PEFT's rank_pattern / alpha_pattern as ours, keeping the keys that decide some position's value (PEFT takes
    the first key that matches, as ours; the others change nothing there and would be refused here)."""
    specs = {REGEX_PREFIX + key: value for key, value in (pattern or {}).items()}
    deciding = {first_match(specs, p) for p in positions}
    return {spec: value for spec, value in specs.items() if spec in deciding}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors named by backbone module path (PEFT's ``base_model.model.`` removed)."""
    # PEFT also saves whole embedding matrices next to an embedding LoRA (base_layer); the backbone has its own.
    # (LoRA factors under base_layer are nested wrappers of target_parameters: peft_experts reads them.)
    tensors = {k: t for k, t in checkpoint.read_tensors(folder, WEIGHTS_FILE).items()
               if ".base_layer." not in k or lora_position(k) is not None}
    outside = [k for k in tensors if not k.startswith(PREFIX)]
    if outside:
        raise ValueError(f"{folder / WEIGHTS_FILE} holds tensors outside PEFT's {PREFIX!r} naming: {outside[:5]}")
    return {k[len(PREFIX):]: t for k, t in tensors.items()}


_SUFFIXES = sorted({*_NAMES.values(), *_EMBEDDING_NAMES.values()}, key=len, reverse=True)


def lora_position(key: str) -> str | None:
    """The module a LoRA tensor's key names (``a.b.lora_A.weight`` -> ``a.b``); None for other tensors."""
    return next((key[:-len(s) - 1] for s in _SUFFIXES if key.endswith("." + s)), None)


def _saved_whole(key: str, entries: tuple[str, ...]) -> bool:
    """PEFT's rule for modules_to_save: a module whose name ends with an entry is saved whole, children included."""
    parts = key.split(".")
    return any((PREFIX + ".".join(parts[:i])).endswith(entries) for i in range(1, len(parts)))


def _refuse_unexplained(heads: dict[str, torch.Tensor], modules_to_save: list[str], backbone_model: nn.Module,
                        source: Path, *, check_ties: bool) -> None:
    """Tensors other than LoRA's must be parameters of the modules PEFT saved whole, and (when written into the
    backbone) not tied to parameters outside them, which PEFT left as they were."""
    listed = [k for k in heads if _saved_whole(k, tuple(modules_to_save))]
    parameters = dict(backbone_model.named_parameters(remove_duplicate=False))
    # With ensure_weight_tying, PEFT lists one module of a tied pair and saves the weight under both names.
    unlisted = [k for k in heads if k not in listed and not any(
        k in parameters and parameters.get(other) is parameters[k] and torch.equal(heads[k], heads[other])
        for other in listed)]
    if unlisted:
        raise ValueError(f"{source} holds tensors that are neither LoRA weights nor in modules_to_save="
                         f"{modules_to_save}: {unlisted[:5]}")
    refuse_missing_parameters(backbone_model, list(heads), source.parent)
    tied = _tied(backbone_model, list(heads)) if check_ties else {}
    if tied:
        raise ValueError(f"{source} holds a trained copy of {', '.join(tied)}, which this backbone ties to "
                         f"{sorted({n for names in tied.values() for n in names})}: writing it would change those "
                         "too, unlike in PEFT. Load it with keep_backbone_apart=True and attach=False, which keeps "
                         "the copy apart from the backbone")
