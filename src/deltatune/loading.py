"""Load a backbone named on a command line: an offline asset name, a local folder, or a hub id when online."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from . import assets
from . import pooling as pooling_module
from .checkpoint import read_config


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; a path such as /x/y is not one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def model_path(spec: str) -> str:
    """An asset name becomes its cached folder (fetched if needed), a local folder or an ``owner/name`` hub id is
    returned for from_pretrained; anything else is an error at once (not after the hub times out)."""
    if spec in assets.MODELS:
        return str(assets.MODELS[spec]())
    if not Path(spec).exists() and not _HUB_ID.fullmatch(spec):
        raise ValueError(f"{spec!r} is not a model asset ({', '.join(assets.MODELS)}), a local folder, "
                         "or a hub id of the form owner/name")
    return spec


def tokenizer_path(spec: str) -> str:
    """:func:`model_path`, for a tokenizer: a local folder must hold one (else transformers would build a tiny
    all-unknown vocabulary and train on it)."""
    path = model_path(spec)
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"{spec} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                         "tokenizer into that folder")
    return path


def model_class(path: str, class_name: str | None = None) -> type:
    """``class_name`` if given (a checkpoint records its backbone's class), else the config's architecture."""
    if class_name is None:
        config = transformers.AutoConfig.from_pretrained(path)
        class_name = next(iter(getattr(config, "architectures", None) or []), "AutoModel")
    if not hasattr(transformers, class_name):
        raise ValueError(f"transformers has no model class {class_name!r}")
    return getattr(transformers, class_name)


def load_backbone(spec: str, class_name: str | None = None, pooling: str = "model",
                  **options: Any) -> nn.Module | tuple[nn.Module, dict]:
    """The model ``spec`` names, in eval mode.  ``options`` go to ``from_pretrained`` (e.g. ``num_labels``; with
    ``output_loading_info=True`` the result is ``(model, info)`` as there).  ``pooling`` (a sequence classifier's,
    :mod:`deltatune.pooling`): ``model``, ``mean``, or ``auto`` (what the checkpoint declares)."""
    path = model_path(spec)
    chosen = pooling_module.resolve(pooling, path)
    try:
        loaded = model_class(path, class_name).from_pretrained(path, **options)
    except OSError as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from None
    except ValueError as error:
        first_line = str(error).strip().splitlines()[0]
        if not first_line.startswith("Unrecognized configuration class"):
            raise
        # transformers goes on to list every model type the class takes: a page of names
        raise ValueError(f"cannot load {spec!r} as {class_name}: {first_line}") from None
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if chosen == "mean":
        pooling_module.use_mean(model)
    model.eval()
    return loaded


def backbone_of_checkpoint(folder: str | Path) -> str:
    """The backbone class a saved delta was trained on."""
    return read_config(Path(folder))["backbone"]["class"]
