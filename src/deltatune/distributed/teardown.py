"""What keeps a process group alive after a run, released before the run leaves the group.

A group still referenced when the process group is destroyed lives on, its gloo threads running, until the
interpreter exits, and its teardown then can abort a rank whose run succeeded ("terminate called without an active
exception").  DeepSpeed's ZeRO-3 and DTensor (FSDP2) keep such references in caches and module state that their
public teardown does not clear.  These are their internals, so each is looked up leniently; the torchrun tests
fail a command that leaves a gloo thread running, so a release that renames one shows there.
"""

from __future__ import annotations

import importlib

from torch import nn

DTENSOR_CACHES = (  # (module, callable): each keeps device meshes, which keep their process groups
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
)


def release_dtensor_caches() -> None:
    for module, name in DTENSOR_CACHES:
        clear = _lookup(module, name)
        if callable(clear):
            clear()


def release_zero3(model: nn.Module) -> None:
    """After ``engine.destroy()`` a ZeRO-3 model is still on ``parameter_offload.FWD_MODULE_STACK``, and in the
    ``lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release`` (a method's cache, kept by the class,
    keyed by the model's modules); through the model, the engine and its groups stay alive."""
    stack = _lookup("deepspeed.runtime.zero.parameter_offload", "FWD_MODULE_STACK")
    if isinstance(stack, list):
        stack[:] = [module for module in stack if module is not model]
    method = _lookup("deepspeed.runtime.zero.partitioned_param_coordinator",
                     "PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(method, "__closure__", None) or ():  # the cache, under DeepSpeed's profiling wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def _lookup(module: str, path: str) -> object | None:
    """``module.path`` (a dotted path), or None if this release has no such thing."""
    try:
        found: object = importlib.import_module(module)
    except ImportError:
        return None
    for name in path.split("."):
        found = getattr(found, name, None)
    return found
