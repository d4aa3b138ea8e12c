"""A registry of named deltas served from one backbone: loaded from checkpoint folders (deltatune's or PEFT's)
when registered (and kept if they fit) or when first asked for, kept in a :class:`~deltatune.bank.DeltaBank`, and
evicted least recently used first when their tensors would exceed a byte budget.  Names can be added and removed
while serving."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from .. import checkpoint
from ..base import DeltaBase
from . import DeltaBank


def delta_bytes(delta: DeltaBase) -> int:
    """Memory a served delta takes: its tensors (with its own head), and the bank's stacked copy of them."""
    tensors = (*delta.delta_parameters(), *delta.backbone_apart.values())
    return 2 * sum(t.numel() * t.element_size() for t in tensors)


class DeltaRegistry:
    """Name -> checkpoint folder; at most ``max_bytes`` of deltas loaded at once (None: no bound)."""

    def __init__(self, backbone_model: nn.Module, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive (or None for no bound), not {max_bytes}")
        self.backbone_model, self.max_bytes = backbone_model, max_bytes
        self.bank = DeltaBank(backbone_model)
        self._sources: dict[str, Path] = {}
        self._labels: dict[str, list[str]] = {}
        self._types: dict[str, str] = {}
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        # Held while the model runs a batch (the engine takes it) and while a delta loads: loading may run a probe
        # forward pass with hooks of its own, which must not meet a batch.
        self.lock = threading.RLock()
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def loaded_bytes(self) -> int:
        return sum(self._loaded.values())

    def register(self, name: str, folder: str | os.PathLike, labels: list[str] | None = None) -> None:
        """Make ``folder`` (a deltatune checkpoint or a PEFT LoRA adapter) servable as ``name``.  It is loaded and
        checked now, so that a delta the bank cannot serve is refused here rather than failing the batches it
        would share; it stays loaded if it fits ``max_bytes`` without unloading another, else it is loaded again
        when first used.  A head trained with the delta stays its own (the backbone is not changed); ``labels``
        name its outputs."""
        folder = Path(folder)
        with self.lock:
            if not name or not isinstance(name, str) or name in self._sources:
                raise ValueError(f"a delta name must be a new non-empty string; {name!r} is "
                                 f"{'taken' if name in self._sources else 'not one'}")
            delta = self._read(folder)
            self.bank.check(delta, name)
            self._sources[name] = folder
            self._types[name] = delta.delta_type
            if labels is not None:
                self._labels[name] = list(labels)
            size = delta_bytes(delta)
            if self._fits(size):
                self._keep(name, delta, size)

    def labels(self, name: str) -> list[str] | None:
        """The names of the outputs of ``name``'s own head, if it was registered with them."""
        self.require(name)
        return self._labels.get(name)

    def delta_type(self, name: str) -> str:
        """The delta type saved in ``name``'s folder (``lora`` for a PEFT adapter)."""
        self.require(name)
        return self._types[name]

    def unregister(self, name: str) -> None:
        with self.lock:
            self.require(name)
            if name in self._loaded:
                self._evict(name)
            del self._sources[name]
            del self._types[name]
            self._labels.pop(name, None)

    def acquire(self, names: list[str | None]) -> None:
        """Load the named deltas that are not loaded (evicting others to stay within the budget) and mark them
        used; raises if they cannot all be held at once."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        with self.lock:
            for name in wanted:
                self.require(name)
            for name in wanted:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                else:
                    self._load(name, keep=set(wanted))

    def require(self, name: str) -> None:
        """Raise KeyError unless ``name`` is registered."""
        if name not in self._sources:
            raise KeyError(f"no delta named {name!r}; known: {', '.join(self._sources) or 'none'}")

    def _read(self, folder: Path) -> DeltaBase:
        if (folder / checkpoint.CONFIG_FILE).is_file():
            return DeltaBase.from_finetuned(folder, self.backbone_model, attach=False, keep_backbone_apart=True)
        if (folder / "adapter_config.json").is_file():
            from ..peft_format import from_peft

            return from_peft(folder, self.backbone_model, attach=False, keep_backbone_apart=True)
        raise FileNotFoundError(f"{folder} is neither a deltatune checkpoint ({checkpoint.CONFIG_FILE}) nor a PEFT "
                                "adapter (adapter_config.json)")

    def _load(self, name: str, keep: set[str]) -> None:
        delta = self._read(self._sources[name])
        size = delta_bytes(delta)
        while self._loaded and not self._fits(size):
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            self._evict(victim)
        if not self._fits(size):
            raise MemoryError(f"delta {name!r} ({size:,} bytes) and the others this batch needs do not fit "
                              f"max_bytes={self.max_bytes:,}")
        self._keep(name, delta, size)

    def _fits(self, size: int) -> bool:
        return self.max_bytes is None or self.loaded_bytes() + size <= self.max_bytes

    def _keep(self, name: str, delta: DeltaBase, size: int) -> None:
        self.bank.add(delta, name)
        self._loaded[name] = size

    def _evict(self, name: str) -> None:
        self.bank.remove(name)
        del self._loaded[name]
        self.evictions += 1
