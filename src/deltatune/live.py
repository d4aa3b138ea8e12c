"""The delta objects alive on each backbone: their names stay reserved while they exist (attached, detached or
merged, each can come back), and the checkpoint folders they were loaded from, so one is not applied twice."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .base import DeltaBase

_LIVE: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[DeltaBase]] = weakref.WeakKeyDictionary()
_LOADED: weakref.WeakKeyDictionary[nn.Module, dict[Path, weakref.ref]] = weakref.WeakKeyDictionary()


def add(delta: DeltaBase) -> None:
    _LIVE.setdefault(delta.backbone_model, weakref.WeakSet()).add(delta)


def deltas_on(backbone: nn.Module) -> list[DeltaBase]:
    return list(_LIVE.get(backbone, ()))


def names_on(backbone: nn.Module) -> set[str]:
    return {delta.name for delta in _LIVE.get(backbone, ())}


def any_hooked(backbone: nn.Module) -> bool:
    """Whether some delta's hooks are on this backbone (attached and not merged)."""
    return any(delta.attached and not delta.merged for delta in _LIVE.get(backbone, ()))


def loaded(delta: DeltaBase, folder: Path) -> None:
    _LOADED.setdefault(delta.backbone_model, {})[folder.resolve()] = weakref.ref(delta)


def refuse_second_copy(backbone: nn.Module, folder: Path, options: dict[str, Any]) -> None:
    earlier = _LOADED.get(backbone, {}).get(folder.resolve())
    delta = earlier() if earlier is not None else None
    if delta is not None and (delta.attached or delta.merged) and "name" not in options:
        raise ValueError(f"{folder} is already loaded on this backbone as delta {delta.name!r}, so it would apply "
                         "twice; detach that one first, or pass name=... to add a second copy on purpose")
