"""One class per engine, each wrapping the model and its optimizer the way that engine's own documentation does.

A strategy is made before the backbone is loaded (ZeRO-3 partitions parameters as they are created), and
:meth:`Strategy.prepare` runs after the delta is built, so every trainable parameter is known to the engine:

- ``single``: one process, ``torch.optim.AdamW``.
- ``ddp``: ``DistributedDataParallel``; every rank holds the whole model, gradients are averaged.
- ``fsdp``: FSDP2 ``fully_shard`` on each block the model names in ``_no_split_modules``, then on the whole model.
  Frozen backbone weights and trainable delta weights share units (FSDP2 shards per parameter, so mixed
  ``requires_grad`` is allowed); the optimizer holds the delta's shards.
- ``deepspeed-zero2`` / ``deepspeed-zero3``: ``deepspeed.initialize`` with the same AdamW as a client optimizer;
  ZeRO-3 partitions the backbone while it loads (``HfDeepSpeedConfig``), and the delta is built on it by gathering
  each module's weights when they are read.

All of them step the same AdamW with the same schedule and clip the global gradient norm, so a run on N processes
takes the steps a single process takes on the same global batches.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import sharding
from . import teardown
from .world import World

EFFICIENT_LOADING = "FSDP_CPU_RAM_EFFICIENT_LOADING"
ENGINE_FOLDER = "last.deepspeed"  # DeepSpeed's own checkpoint of a run's optimizer, beside last.pt
Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Strategy:
    """One process: the plain loop."""

    name = "single"

    def __init__(self, world: World, precision: str = "fp32", deepspeed_config: dict | None = None,
                 accumulation: int = 1, max_grad_norm: float = 1.0) -> None:
        self.world, self.precision = world, precision
        self.model: nn.Module | None = None  # what the training forward calls (a wrapper, for some engines)

    def loading(self) -> contextlib.AbstractContextManager:
        """The context the backbone is loaded in."""
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> None:
        """Move the loaded backbone to this rank's device (before the delta is built on it)."""
        model.to(self.world.device)

    def prepare(self, model: nn.Module, trainable: Callable[[], list[nn.Parameter]], lr: float, weight_decay: float,
                schedule: Schedule, max_grad_norm: float, accumulation: int) -> None:
        """Wrap ``model``; ``trainable()`` lists the parameters to train once the model is wrapped."""
        self.model, self.max_grad_norm = self._wrap(model), max_grad_norm
        self.parameters = trainable()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.schedule = schedule(self.optimizer)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def close(self) -> None:
        """Drop the engine's objects (a DDP reducer freed after its process group can hang the process)."""
        self.__dict__ = {"world": self.world, "precision": self.precision, "model": None}
        gc.collect()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=_device_type(), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def syncing(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: gradients are reduced across ranks on the ``last``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def training_state(self, out: Path, step: int) -> dict[str, Any]:
        """What last.pt keeps of the optimizer and the schedule (every rank calls it)."""
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def saved(self, out: Path, state: dict[str, Any]) -> None:
        """After last.pt holds ``state``."""

    def load_training_state(self, out: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


class DDP(Strategy):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        devices = [self.world.local_rank] if torch.cuda.is_available() else None
        self._ddp = DistributedDataParallel(model, device_ids=devices)
        return self._ddp

    def syncing(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self._ddp.no_sync()


class FSDP(Strategy):
    name = "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        for block in _repeated_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self._fsdp = model
        return model

    @contextlib.contextmanager
    def loading(self):
        """Every rank loads the weights: under an accelerate FSDP config transformers would leave them on the meta
        device outside rank 0 (its "CPU-RAM-efficient loading", which expects accelerate's own wrapping)."""
        before = os.environ.get(EFFICIENT_LOADING)
        os.environ[EFFICIENT_LOADING] = "false"
        try:
            yield
        finally:
            os.environ.pop(EFFICIENT_LOADING) if before is None else os.environ.update({EFFICIENT_LOADING: before})

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 casts the gathered parameters itself (MixedPrecisionPolicy)

    def close(self) -> None:
        teardown.release_dtensor_caches()
        super().close()

    def syncing(self, last: bool) -> contextlib.AbstractContextManager:
        self._fsdp.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # The optimizer's moments are shards like the parameters: last.pt keeps them whole, so it equals a single
    # process's state and resumes on any number of ranks.
    def training_state(self, out: Path, step: int) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state["state"] = {i: {k: sharding.full_tensor(v) for k, v in moments.items()}
                          for i, moments in state["state"].items()}
        return {"optimizer": state, "schedule": self.schedule.state_dict()}

    def load_training_state(self, out: Path, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        optimizer = state["optimizer"]
        for i, moments in optimizer["state"].items():
            param = self.parameters[i]
            for k, value in moments.items():
                if sharding.is_dtensor(param) and value.dim():
                    moments[k] = distribute_tensor(value, param.device_mesh, param.placements)
        super().load_training_state(out, state)


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards apart: the blocks the model names in ``_no_split_modules`` that repeat (its layers).
    A block met once (BERT's embeddings) stays with the root, where a delta may read it outside its forward (a
    soft prompt embeds the input itself).  A delta parameter shared by several blocks (Compacter's shared rules)
    cannot be sharded with one of them: refused."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if type(module).__name__ in names:
            found.setdefault(type(module).__name__, []).append(module)
    blocks = [m for group in found.values() if len(group) > 1 for m in group]
    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for name, parameter in block.named_parameters():
            if owner.setdefault(id(parameter), i) != i:
                raise ValueError(f"{name} is shared by several {type(block).__name__} blocks, which FSDP2 shards "
                                 "apart; this delta (shared parameters across layers) trains with --strategy ddp, "
                                 "deepspeed-zero2 or deepspeed-zero3")
    return blocks


class DeepSpeed(Strategy):
    """ZeRO stage 2 or 3.  ``deepspeed_config`` (a DeepSpeed JSON config) may add settings (offload, bucket sizes,
    ...); those the command line decides (accumulation, clipping, precision) must not contradict it."""

    stage = 2

    def __init__(self, world: World, precision: str = "fp32", deepspeed_config: dict | None = None,
                 accumulation: int = 1, max_grad_norm: float = 1.0) -> None:
        super().__init__(world, precision)
        self.user_config = dict(deepspeed_config or {})
        self.config = self._config(accumulation, max_grad_norm)  # checked before anything loads
        self._hf_config = None

    def _config(self, accumulation: int, max_grad_norm: float) -> dict[str, Any]:
        ours = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation,
                "gradient_clipping": max_grad_norm, "bf16": {"enabled": self.precision == "bf16"},
                "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
        user = self.user_config
        for key, value in ours.items():
            if key in user and user[key] != value:
                raise ValueError(f"the DeepSpeed config sets {key}={user[key]!r}, but this run uses {value!r} "
                                 "(from --grad-accum, --precision or the loop's gradient clipping); leave it out "
                                 "of the file")
        zero = {**user.get("zero_optimization", {})}
        if zero.get("stage", self.stage) != self.stage:
            raise ValueError(f"the DeepSpeed config asks for ZeRO stage {zero['stage']}, --strategy for {self.stage}")
        return {**user, **ours, "zero_optimization": {**zero, "stage": self.stage}}

    def loading(self) -> contextlib.AbstractContextManager:
        if self.stage != 3:
            return contextlib.nullcontext()
        from .. import compat

        self._hf_config = compat.zero3_loading(self.config)  # kept alive: the backbone loads partitioned
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, trainable: Callable[[], list[nn.Parameter]], lr: float, weight_decay: float,
                schedule: Schedule, max_grad_norm: float, accumulation: int) -> None:
        import deepspeed

        self.config = self._config(accumulation, max_grad_norm)
        if self.stage == 3:
            _register_delta_parameters(model)
        self.parameters = trainable()
        optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.model, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.config)

    def place(self, model: nn.Module) -> None:
        pass  # deepspeed.initialize places the model (and ZeRO-3 partitions it on the device as it loads)

    def close(self) -> None:
        """Free the engine, then leave the process groups through DeepSpeed, which drops its own references to
        them.  A group still referenced is torn down only as the interpreter exits, with its gloo threads running,
        and that can abort a rank whose run succeeded."""
        if self.model is not None:
            self.model.destroy()  # the engine's gradient and module hooks
            if self.stage == 3:
                teardown.release_zero3(self.model.module)
        super().close()  # the engine and the model go, with their references to the groups
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine runs the model in bf16 itself

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop's weights already average over micro-batches
        self.model.step()  # the engine steps the optimizer and the schedule at each accumulation boundary

    def step(self) -> None:
        pass

    # The engine keeps its optimizer partitioned: each rank writes its part with the engine's own checkpoint, in
    # a folder per step (last.pt names it), so a crash while saving leaves the previous pair intact.
    def training_state(self, out: Path, step: int) -> dict[str, Any]:
        tag = f"step-{step}"
        self.model.save_checkpoint(str(out / ENGINE_FOLDER), tag=tag, exclude_frozen_parameters=True,
                                   save_latest=False)
        return {"deepspeed_tag": tag}

    def saved(self, out: Path, state: dict[str, Any]) -> None:
        if self.world.main:
            for old in (out / ENGINE_FOLDER).iterdir():
                if old.name != state["deepspeed_tag"]:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()

    def load_training_state(self, out: Path, state: dict[str, Any]) -> None:
        tag = state.get("deepspeed_tag")
        if tag is None or not (out / ENGINE_FOLDER / tag).is_dir():
            raise FileNotFoundError(f"nothing to resume with DeepSpeed: {out / ENGINE_FOLDER} holds no engine state "
                                    f"for {out / 'last.pt'} (was the run started with another --strategy?)")
        self.model.load_checkpoint(str(out / ENGINE_FOLDER), tag=tag, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)


def _register_delta_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around its forward and its backward, which it finds through the tensors
    the module returns.  A delta that rewrites its host's call returns no tensor, and a shared table (prefix tuning)
    is read by modules that do not own it: so each delta's parameters are registered with the host module, whose
    forward and backward then hold them whole."""
    import deepspeed

    from ..routing import DeltaSlot

    for host in model.modules():
        for slot in host.children():
            if isinstance(slot, DeltaSlot):
                for delta in slot.values():
                    for parameter in delta.parameters():
                        deepspeed.zero.register_external_parameter(host, parameter)


class DeepSpeedZero2(DeepSpeed):
    name, stage = "deepspeed-zero2", 2


class DeepSpeedZero3(DeepSpeed):
    name, stage = "deepspeed-zero3", 3


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, DDP, FSDP, DeepSpeedZero2, DeepSpeedZero3)}


def make_strategy(name: str, world: World, precision: str = "fp32", deepspeed_config: str | Path | None = None,
                  accumulation: int = 1, max_grad_norm: float = 1.0) -> Strategy:
    """The strategy ``name``; ``accumulation`` and ``max_grad_norm`` as the run will use them (a DeepSpeed config
    that contradicts them is refused here, before anything loads)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "single" and world.distributed:
        raise ValueError(f"{world.size} processes were started but --strategy is single; choose ddp, fsdp, "
                         "deepspeed-zero2 or deepspeed-zero3")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    config = None
    if deepspeed_config is not None:
        if not name.startswith("deepspeed"):
            raise ValueError("--deepspeed-config is for --strategy deepspeed-zero2 or deepspeed-zero3")
        config = _read_json(Path(deepspeed_config))
    if name.startswith("deepspeed"):
        _check_deepspeed()
    return STRATEGIES[name](world, precision, config, accumulation, max_grad_norm)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the DeepSpeed config {path}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the DeepSpeed config {path} must be a JSON object")
    return value


def _check_deepspeed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed may guess another accelerator
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ValueError("the deepspeed strategies need DeepSpeed: pip install 'deltatune[distributed]'") from None


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

