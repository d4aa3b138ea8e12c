"""Delta methods, one per file."""

from .adapter import AdapterModel
from .bitfit import BitFitModel
from .compacter import CompacterModel
from .ia3 import IA3Model
from .lora import LoraModel
from .low_rank_adapter import LowRankAdapterModel
from .parallel_adapter import ParallelAdapterModel
from .prefix import PrefixModel
from .soft_prompt import SoftPromptModel

__all__ = ["AdapterModel", "BitFitModel", "CompacterModel", "IA3Model", "LoraModel", "LowRankAdapterModel", "ParallelAdapterModel", "PrefixModel",
           "SoftPromptModel"]
