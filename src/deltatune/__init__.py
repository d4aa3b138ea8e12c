"""deltatune: delta tuning for PyTorch models with an unmodified, frozen backbone."""

from .auto import DELTA_TYPES, AutoDeltaConfig, AutoDeltaModel, register
from .bank import DeltaBank
from .base import DeltaBase
from .config import DeltaConfig
from .methods import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    IA3Model,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
)
from .peft_format import export_peft, from_peft
from .routing import Route

__version__ = "0.1.0"

__all__ = ["DELTA_TYPES", "AdapterModel", "AutoDeltaConfig", "AutoDeltaModel", "BitFitModel", "CompacterModel", "DeltaBank", "DeltaBase", "DeltaConfig", "IA3Model", "LoraModel", "LowRankAdapterModel",
           "ParallelAdapterModel", "PrefixModel", "Route", "SoftPromptModel", "export_peft",
           "from_peft", "register"]
