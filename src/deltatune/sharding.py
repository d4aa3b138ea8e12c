"""Tensors that one process holds only a shard of: FSDP2's ``DTensor`` and DeepSpeed ZeRO-3's partitioned parameters.

Deltas are built, saved and loaded with whole tensors.  These helpers see through both kinds of shard, so a checkpoint
written under sharding holds full tensors (never a shard, never an empty tensor) and equals the one a single process
writes.  Gathers are collectives: every rank must make the same calls.  Nothing here imports DeepSpeed unless a
ZeRO-3 parameter is met; plain tensors pass through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``data`` is an empty placeholder outside a forward pass)."""
    return hasattr(tensor, "ds_id")


def is_sharded(tensor: torch.Tensor) -> bool:
    return is_dtensor(tensor) or is_partitioned(tensor)


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a DTensor states it; a ZeRO-3 parameter keeps it in ``ds_shape``)."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def full_numel(tensor: torch.Tensor) -> int:
    return tensor.ds_numel if is_partitioned(tensor) else tensor.numel()


@contextlib.contextmanager
def gathered(tensors: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """ZeRO-3 parameters among ``tensors`` hold their whole values inside the block (collective); with
    ``modifier_rank`` that rank's changes are partitioned back on exit."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if partitioned:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [t for t in partitioned if t.ds_status == ZeroParamStatus.NOT_AVAILABLE]  # not gathered yet
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def each_module_whole(model: nn.Module) -> Iterator[None]:
    """For a pass over a ZeRO-3 partitioned model outside its engine (building a delta, checking the model): each
    module's own parameters are gathered while it runs and released after it, so no rank holds more than one
    module's whole weights."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield
        return
    open_gathers: list[contextlib.ExitStack] = []

    def before(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(module.parameters(recurse=False)))
        open_gathers.append(stack)

    def after(module, args, output):
        open_gathers.pop().close()

    handles = [hook for m in model.modules()
               for hook in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_gathers:  # a pass stopped early (the probe stops once it has seen every position)
            open_gathers.pop().close()


def _has_master(tensor: torch.Tensor) -> bool:
    """A low-precision parameter trained by a DeepSpeed optimizer, which holds its fp32 master copy."""
    return (tensor.dtype != torch.float32 and getattr(tensor, "requires_grad", False)
            and (hasattr(tensor, "_hp_mapping") or hasattr(tensor, "_z3_optimizer")))


def full_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a checkpoint holds ``tensor`` in: the master copy's, for a DeepSpeed bf16 parameter."""
    return torch.float32 if _has_master(tensor) else tensor.dtype


def settle(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded, in the compute dtype, after a forward without a backward (an
    evaluation): reshard them, so what is read or loaded is the sharded parameter itself."""
    for module in model.modules():
        if type(module).__name__.startswith("FSDP") and hasattr(module, "reshard"):
            module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of ``tensor``, detached (collective for a shard); a DeepSpeed bf16 parameter's fp32
    master copy, which is what the optimizer trains."""
    if _has_master(tensor):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(tensor).detach().cpu()
    if is_dtensor(tensor):
        return tensor.detach().full_tensor()
    if is_partitioned(tensor):
        with gathered([tensor]):
            return tensor.detach().clone()
    return tensor.detach()


def copy_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target <- value``, where ``value`` is the whole tensor and ``target`` may be a shard of it (or a DeepSpeed
    bf16 parameter: its master copy is set too)."""
    if _has_master(target):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(target, value.to(torch.float32))
        value = value.to(target.dtype)
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        target.copy_(value)
    elif is_partitioned(target):
        import torch.distributed as dist

        with gathered([target], modifier_rank=0):
            if dist.get_rank() == 0:
                target.data.copy_(value)
    else:
        target.copy_(value)


def unwrapped_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps it for a generated ``FSDP<Class>`` subclass."""
    cls = type(model)
    while cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls


def any_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds (its shards, for sharded ones)."""
    total = 0
    for p in model.parameters():
        held = p.to_local() if is_dtensor(p) else p.ds_tensor if is_partitioned(p) else p
        total += held.numel() * held.element_size()
    return total


def main_process() -> bool:
    """Rank 0 of a process group, or the only process: the one that writes files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
