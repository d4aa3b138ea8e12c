"""Delta methods, one per file."""

from .adapter import AdapterModel
from .bitfit import BitFitModel
from .ia3 import IA3Model
from .lora import LoraModel

__all__ = ["AdapterModel", "BitFitModel", "IA3Model", "LoraModel"]
