"""LoRA checkpoints in PEFT's format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a tensor ``base_model.model.<module>.lora_A.weight`` (``lora_B.weight``; ``lora_magnitude_vector`` for
DoRA; ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), with the same shapes and the same formula as
:class:`~deltatune.LoraModel`, so the numbers move across unchanged.  PEFT features with no LoRA counterpart here
(``bias`` other than ``"none"``, ``modules_to_save``, rank/alpha patterns, layer selection) are refused, not dropped;
so are adapters whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ), which are only right on
those rewritten weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .compat import Conv1D
from .methods.lora import LoraModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_NAMES = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _peft_name(layer: nn.Module, name: str) -> str:
    return (_EMBEDDING_NAMES if layer.embedding else _NAMES)[name]


def export_peft(delta: LoraModel, save_directory: str | os.PathLike) -> Path:
    """Write ``delta`` so that ``peft.PeftModel.from_pretrained(backbone, save_directory)`` loads it."""
    if not isinstance(delta, LoraModel):
        raise TypeError(f"only LoRA deltas have a PEFT format, not {type(delta).__name__}")
    if delta.unfrozen_backbone:
        raise ValueError(
            f"the delta also trains backbone parameters {delta.unfrozen_backbone[:3]}; PEFT keeps those in its "
            "modules_to_save format, which is not written here. Use save_finetuned, or freeze them first."
        )
    config = delta.config
    if config.qkv_slices:
        raise ValueError(f"the delta adapts the {config.qkv_slices} slices of fused q/k/v projections, which PEFT's "
                         "LoRA cannot express (it adapts a module whole); use save_finetuned, or build the delta "
                         "with qkv_slices=None")
    hosts = dict(delta.backbone_model.named_modules())
    tensors = {
        f"{PREFIX}{position}.{_peft_name(layer, name)}": tensor
        for position, layer in delta.deltas.items()
        for name, tensor in layer.state_dict().items()
    }
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none",
        "target_modules": list(delta.positions), "modules_to_save": None,
        "fan_in_fan_out": any(isinstance(hosts[p], Conv1D) for p in delta.positions),
    }
    return checkpoint.write(save_directory, peft_config, tensors, CONFIG_FILE, WEIGHTS_FILE, paired=False)


def _refuse_unsupported(config: dict, folder: Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is read")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained biases)")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication",
                "lora_bias", "trainable_token_indices", "target_parameters", "use_qalora"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS) or config.get("loftq_config"):
        # These inits rewrite the base weights when the adapter is made: on the original weights it is wrong.
        problems.append(f"init_lora_weights={init!r} changed the base model's weights, so the adapter is only right "
                        "on those; convert it in PEFT first (save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...)) and import the converted adapter")
    if problems:
        raise ValueError(f"{folder / CONFIG_FILE} uses PEFT features deltatune does not import: {'; '.join(problems)}")


def read_config(folder: Path) -> dict:
    """A PEFT adapter folder's config, refused if it uses what deltatune does not import (anything but LoRA...)."""
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter: {CONFIG_FILE} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text())
    _refuse_unsupported(config, folder)
    return config


def from_peft(peft_model_path: str | os.PathLike, backbone_model: nn.Module, *, attach: bool = True,
              name: str | None = None) -> LoraModel:
    """Import a PEFT LoRA adapter onto ``backbone_model`` as a :class:`LoraModel` (attached unless ``attach=False``)."""
    folder = Path(peft_model_path)
    config = read_config(folder)
    # PEFT also saves whole embedding matrices next to an embedding LoRA (base_layer); the backbone has its own.
    tensors = {k: t for k, t in checkpoint.read_tensors(folder, WEIGHTS_FILE).items() if ".base_layer." not in k}
    suffixes = sorted({*_NAMES.values(), *_EMBEDDING_NAMES.values()}, key=len, reverse=True)
    found = {k[len(PREFIX):-len(s) - 1] for k in tensors for s in suffixes if k.startswith(PREFIX) and k.endswith("." + s)}
    order = [name for name, _ in backbone_model.named_modules()]
    delta = LoraModel(
        backbone_model, positions=sorted(found, key=lambda p: order.index(p) if p in order else -1), attach=False,
        lora_r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
        use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora", False), name=name,
    )
    ours = {f"{PREFIX}{p}.{_peft_name(layer, n)}": t for p, layer in delta.deltas.items() for n, t in layer.state_dict().items()}
    checkpoint.check_tensors(tensors, ours, folder / WEIGHTS_FILE)
    with torch.no_grad():
        for key, tensor in ours.items():
            tensor.copy_(tensors[key])
    return delta.attach() if attach else delta
