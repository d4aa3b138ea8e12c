"""Training on several processes with the engines people already run: torch DDP, FSDP2 (``fully_shard``) and
DeepSpeed ZeRO-2/3, launched by ``torchrun`` or ``accelerate launch`` (see docs/distributed.md).

:mod:`.world` reads the launcher's environment and joins the process group; :mod:`.strategies` wraps the model and
its optimizer for one engine.  Each step's global batch is the one a single process would take, split across ranks
and micro-batches with loss weights that make the averaged gradient equal the single-process one.
"""

from .strategies import STRATEGIES, Strategy, make_strategy
from .world import World

__all__ = ["STRATEGIES", "Strategy", "World", "make_strategy"]
