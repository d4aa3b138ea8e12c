"""Which process this is, from the variables ``torchrun`` and ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), and the process group they join.

The group is joined with a timeout, so a rank that dies leaves the others with an error instead of a hang (the
launcher also stops the others when one exits with an error).  CPU processes talk over gloo, GPUs over NCCL.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and "RANK" not in os.environ:
            raise RuntimeError("WORLD_SIZE is set but RANK is not: start the processes with torchrun or accelerate "
                               "launch, which set both")
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def device(self) -> torch.device:
        """This rank's GPU (by ``LOCAL_RANK``) when there are GPUs, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self, timeout_seconds: float | None = None) -> None:
        """Join the process group (once); a no-op for one process."""
        if not self.distributed or dist.is_initialized():
            return
        seconds = timeout_seconds or float(os.environ.get("DELTATUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def total(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def leave(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
