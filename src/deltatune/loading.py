"""Load a backbone named on a command line: an offline asset name, a local folder, or a hub id when online."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn

from . import assets
from .checkpoint import read_config


def model_path(spec: str) -> str:
    """An asset name becomes its cached folder (fetched if needed); anything else is returned for from_pretrained."""
    if spec in assets.MODELS:
        return str(assets.MODELS[spec]())
    return spec


def model_class(path: str, class_name: str | None = None) -> type:
    """``class_name`` if given (a checkpoint records its backbone's class), else the config's architecture."""
    if class_name is None:
        config = transformers.AutoConfig.from_pretrained(path)
        class_name = next(iter(getattr(config, "architectures", None) or []), "AutoModel")
    if not hasattr(transformers, class_name):
        raise ValueError(f"transformers has no model class {class_name!r}")
    return getattr(transformers, class_name)


def load_backbone(spec: str, class_name: str | None = None, **options: Any) -> nn.Module | tuple[nn.Module, dict]:
    """The model ``spec`` names, in eval mode.  ``options`` go to ``from_pretrained`` (e.g. ``num_labels``; with
    ``output_loading_info=True`` the result is ``(model, info)`` as there)."""
    path = model_path(spec)
    if not Path(path).exists() and "/" not in path:
        raise ValueError(f"{spec!r} is not a model asset ({', '.join(assets.MODELS)}), a local folder, "
                         "or a hub id of the form owner/name")
    try:
        loaded = model_class(path, class_name).from_pretrained(path, **options)
    except OSError as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from None
    (loaded[0] if isinstance(loaded, tuple) else loaded).eval()
    return loaded


def backbone_of_checkpoint(folder: str | Path) -> str:
    """The backbone class a saved delta was trained on."""
    return read_config(Path(folder))["backbone"]["class"]
