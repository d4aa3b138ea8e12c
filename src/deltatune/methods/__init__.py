"""Delta methods, one per file."""

from .adapter import AdapterModel
from .bitfit import BitFitModel
from .lora import LoraModel

__all__ = ["AdapterModel", "BitFitModel", "LoraModel"]
