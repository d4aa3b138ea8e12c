"""AutoDelta: name a delta type, get a delta; load a checkpoint without knowing its type.

    cfg = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4})
    delta = AutoDeltaModel.from_config(cfg, backbone_model=model)        # default positions for the family
    delta = AutoDeltaModel.from_finetuned("out/", backbone_model=model)   # type and settings from the checkpoint

A method written outside the package subclasses :class:`~deltatune.DeltaBase` with a ``delta_type`` and is made
available by :func:`register` (see docs/custom_method.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from . import checkpoint
from .config import DeltaConfig

if TYPE_CHECKING:
    from .base import DeltaBase

# Every delta type by name.  DeltaBase subclasses with their own ``delta_type`` are entered here as they are
# defined (DeltaBase.__init_subclass__ calls _enter); this module imports no method, so every module can use it.
DELTA_TYPES: dict[str, type[DeltaBase]] = {}


def _enter(method: type[DeltaBase]) -> None:
    known = DELTA_TYPES.get(method.delta_type)
    if known is not None and known.__module__.startswith("deltatune.") and known.__qualname__ != method.__qualname__:
        raise ValueError(f"delta_type {method.delta_type!r} is deltatune's {known.__name__}; choose another name")
    DELTA_TYPES[method.delta_type] = method


def method_for(delta_type: str) -> type[DeltaBase]:
    if delta_type not in DELTA_TYPES:
        raise ValueError(f"unknown delta_type {delta_type!r}; registered: {', '.join(sorted(DELTA_TYPES))}")
    return DELTA_TYPES[delta_type]


def register(method: type[DeltaBase]) -> type[DeltaBase]:
    """Make ``method`` available by its ``delta_type`` (usable as a class decorator)."""
    from .base import DeltaBase

    if not (isinstance(method, type) and issubclass(method, DeltaBase)) or "delta_type" not in method.__dict__:
        raise TypeError(f"{method!r} is not a DeltaBase subclass with its own delta_type")
    _enter(method)  # subclassing entered it already, checking for clashes
    return method


@dataclass
class AutoDeltaConfig:
    """A delta type and its method's config."""

    delta_type: str
    config: DeltaConfig

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoDeltaConfig:
        values = dict(values)
        if "delta_type" not in values:
            raise ValueError(f"the config needs a 'delta_type'; registered: {', '.join(sorted(DELTA_TYPES))}")
        delta_type = values.pop("delta_type")
        return cls(delta_type, method_for(delta_type).config_class.from_dict(values))

    @classmethod
    def from_finetuned(cls, finetuned_model_path: str | os.PathLike) -> AutoDeltaConfig:
        saved = checkpoint.read_config(finetuned_model_path)
        return cls.from_dict({"delta_type": saved["delta_type"], **saved["config"]})


class AutoDeltaModel:
    @staticmethod
    def from_config(config: AutoDeltaConfig | dict[str, Any], backbone_model: nn.Module, **options: Any) -> DeltaBase:
        """Build and attach the delta; positions left unset come from the family's common names."""
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        return method_for(config.delta_type)(backbone_model, **config.config.to_dict(), **options)

    @staticmethod
    def from_finetuned(finetuned_model_path: str | os.PathLike, backbone_model: nn.Module, **options: Any) -> DeltaBase:
        from .base import DeltaBase

        return DeltaBase.from_finetuned(finetuned_model_path, backbone_model, **options)
