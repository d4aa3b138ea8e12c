"""DeltaBase: build a delta object on a backbone, attach/detach it, freeze, merge, log, save and load it."""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, TextIO

import torch
from torch import nn

from . import auto, backbone_fingerprint, checkpoint, live, merge_safety, routing, sharding, threads
from .auto import DELTA_TYPES
from .addressing import DELTA_SLOT, addressable_names, match_names, resolve_positions
from .config import DeltaConfig
from .probe import Seen, probe, reached
from .routing import Route



class DeltaStateDictWarning(UserWarning):
    """The backbone's ``state_dict()`` is a subset: only the trainable tensors of a frozen backbone."""

_creation = itertools.count()  # fixes the order in which deltas on one module run


def _changes_model(method):
    """Attach, detach, merge and unmerge are refused while another thread runs the model (:mod:`threads`)."""

    @functools.wraps(method)
    def change(self: DeltaBase, *args: Any, **kwargs: Any) -> DeltaBase:
        try:
            with threads.changing(self.backbone_model, method.__name__):
                return method(self, *args, **kwargs)
        finally:
            threads.watch(self.backbone_model, live.any_hooked(self.backbone_model))

    return change


def module_key(position: str) -> str:
    """A position as a key of :attr:`DeltaBase.modules_by_position` (module names may not contain dots)."""
    return position.replace(".", "/") or "/"


class DeltaBase(nn.Module):
    """A set of delta modules attached to chosen positions of a frozen, unmodified backbone.

    The delta is an ``nn.Module`` owning its delta modules (``modules_by_position``, not the backbone), so
    ``delta.to(...)``, ``delta.double()``, ``delta.eval()``, ``delta.parameters()`` and ``delta.state_dict()`` reach
    them whether the delta is attached, detached or merged (checkpoints use :meth:`delta_state_dict`).  Attached, the
    same modules are also children of the backbone, so ``model.to(...)`` moves them.

    Arguments: the backbone; ``modified_modules`` / ``exclude_modules`` (see :mod:`deltatune.addressing`); the
    method's hyper-parameters (fields of its ``config_class``); ``name``, the slot name on each module (default: the
    delta type, or ``<type>_<n>`` when taken); ``pseudo_input`` for the probe pass when the model's own config cannot
    provide one; ``attach=False`` to build without attaching; ``positions``, exact full module names that replace
    the specs (used when loading a checkpoint); ``interactive_modify=True`` (or a port number) to pick the modules
    on a local web page (:func:`deltatune.selector.select_modules`).

    Subclasses declare ``delta_type``, ``config_class``, ``route`` and ``mergeable`` and implement :meth:`build`,
    which makes the delta module for one position from the module and what the probe saw flow through it.
    """

    delta_type: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    route: ClassVar[Route]
    mergeable: ClassVar[bool] = False
    takes_modules: ClassVar[bool] = True  # False: the method rewrites the model's call and picks its own positions
    # Where the method goes when no modules are named, in common names (see deltatune.structures): config fields,
    # or a list of alternatives (the first the model has all names for).  None: modified_modules is required.
    default_positions: ClassVar[dict[str, list[str]] | list[dict[str, list[str]]] | None] = None
    # AdamW's peak learning rate that suits the method (deltatune train's default; the middle of a study's grid).
    default_lr: ClassVar[float] = 1e-3

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "delta_type" in cls.__dict__:
            auto._enter(cls)

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        *,
        name: str | None = None,
        pseudo_input: Any = None,
        attach: bool = True,
        positions: list[str] | None = None,
        interactive_modify: bool | int = False,
        allow_larger_than_backbone: bool = False,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        super().__init__()
        modified_modules, exclude_modules = _as_list(modified_modules), _as_list(exclude_modules)
        if interactive_modify is not False:
            if modified_modules:
                raise ValueError("pass either modified_modules or interactive_modify, not both")
            from .selector import select_modules

            port = 0 if interactive_modify is True else int(interactive_modify)
            modified_modules = select_modules(backbone_model, self.delta_type, port=port, **hyperparameters)
        if any(sharding.is_dtensor(p) for p in backbone_model.parameters()):
            raise ValueError(f"{type(backbone_model).__name__} is already sharded by FSDP2 (fully_shard), which would "
                             "leave a new delta's parameters out of its units (unsynchronised across ranks): build the "
                             "delta first, then call fully_shard")
        object.__setattr__(self, "backbone_model", backbone_model)  # not a submodule: the delta does not own it
        self.config = self.config_class.from_dict(
            {"modified_modules": modified_modules, "exclude_modules": list(exclude_modules or []), **hyperparameters}
        )
        self.default_positions_of: str | None = None  # the family whose common names chose the positions
        with sharding.each_module_whole(backbone_model):
            self._find_and_build(backbone_model, positions, pseudo_input, allow_larger_than_backbone)
        self.order = next(_creation)
        if name is not None and name in live.names_on(backbone_model):
            raise ValueError(f"a delta named {name!r} already exists on this backbone (attached, detached or merged); "
                             "choose another name")
        self.name = name or self._free_name()
        live.add(self)
        self.unfrozen_backbone: list[str] = []
        # Backbone parameters trained with this delta (a classification head), held apart from the backbone so
        # several deltas can share it (from_finetuned(keep_backbone_apart=True), read by a DeltaBank).
        self.backbone_apart: dict[str, torch.Tensor] = {}
        self.attached = False
        self.merged = False
        self._merge_state: dict[str, dict[str, Any]] = {}
        self._state_dict_hook = None
        self._filter_state_dict = False
        self._frozen_from: dict[str, bool] | None = None
        self._told_subset = False
        if attach:
            self.attach()

    def _find_and_build(self, backbone_model: nn.Module, positions: list[str] | None, pseudo_input: Any,
                        allow_larger_than_backbone: bool) -> None:
        if positions is None:
            if not self.takes_modules and self.config.modified_modules:
                raise ValueError(f"{type(self).__name__} acts on the model's call; it takes no modified_modules")
            if self.takes_modules and self.config.modified_modules is None:
                self._use_default_positions()
            positions = self.resolve_positions()
            if self.default_positions_of:
                positions = self._called_on_forward(positions, pseudo_input)
        else:
            unknown = sorted(set(positions) - {"", *addressable_names(backbone_model)})  # "": the model itself
            if unknown:
                raise ValueError(f"{type(backbone_model).__name__} has no module(s) {unknown[:5]}")
        self.positions = list(positions)
        modules = dict(backbone_model.named_modules())
        self.pseudo_input = pseudo_input
        self.seen = seen = probe(backbone_model, self.positions, pseudo_input)
        self._hosts = {p: modules[p] for p in self.positions}  # looked up once: attach/detach stay cheap
        self.deltas: dict[str, nn.Module] = self._build({p: modules[p] for p in self.positions}, seen)
        self.modules_by_position = nn.ModuleDict({module_key(p): delta for p, delta in self.deltas.items()})
        self._check_budget(allow_larger_than_backbone)

    # ----------------------------------------------------------------------------------------- for subclasses
    def resolve_positions(self) -> list[str]:
        """Full names of the modules to modify, from the config's specs."""
        return resolve_positions(self.backbone_model, self.config.modified_modules, self.config.exclude_modules)

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        """The delta module for one position, from the probe's record of it."""
        raise NotImplementedError

    def build_all(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        """The delta module of every position (``modules`` in position order).  By default each is built alone
        (:meth:`build`); a method whose modules share parts (one prefix table for all layers, shared PHM rules,
        an adapter read at one module and added at another) makes those parts here first, then the modules."""
        deltas = {}
        for position, module in modules.items():
            with sharding.gathered(module.parameters()):  # ZeRO-3: the module's weights are whole while it is read
                deltas[position] = self.build(position, module, seen[position])
        return deltas

    def _build(self, modules: dict[str, nn.Module], seen: dict[str, Seen]) -> dict[str, nn.Module]:
        try:
            deltas = self.build_all(modules, seen)
        except (MemoryError, torch.OutOfMemoryError) as error:
            raise ValueError(f"{type(self).__name__} could not allocate its deltas ({error}); check the size "
                             f"hyper-parameters: {self.config}") from None
        return {p: delta.train(modules[p].training) for p, delta in deltas.items()}  # each matches its host

    def _check_budget(self, allowed: bool) -> None:
        backbone = sum(sharding.full_numel(p) for k, p in self.backbone_model.named_parameters()
                       if DELTA_SLOT not in k.split("."))
        size = self.num_delta_parameters()
        if size > backbone and not allowed:
            raise ValueError(f"{type(self).__name__} would add {size:,} parameters to a backbone of {backbone:,}; "
                             "check the size hyper-parameters, or pass allow_larger_than_backbone=True")

    def route_at(self, position: str) -> Route:
        """The route at one position: the class's ``route`` unless a method mixes routes."""
        return self.route

    @classmethod
    def _example_modules(cls) -> list[str]:
        return ["query", "value"]

    def _use_default_positions(self) -> None:
        from .structures import default_positions

        try:
            source, defaults = default_positions(self.default_positions, self.backbone_model, repr(self.delta_type))
        except ValueError as error:
            raise ValueError(
                f"{type(self).__name__} needs modified_modules here ({error}), e.g. {self._example_modules()!r}: "
                "names (tail match) or '[r]<regex>' of the modules to modify"
            ) from None
        unknown = sorted(field for field in defaults if not hasattr(self.config, field))
        if unknown:  # qkv_slices: the defaults name part of a fused projection, which this method cannot take
            raise ValueError(f"{type(self).__name__}'s default positions on {source} need the option(s) {unknown}, "
                             f"which {self.config_class.__name__} lacks (q, k or v are slices of a fused projection "
                             "here); pass modified_modules")
        for field, specs in defaults.items():
            if not getattr(self.config, field):
                setattr(self.config, field, specs)
        self.default_positions_of = source

    def _called_on_forward(self, positions: list[str], pseudo_input: Any) -> list[str]:
        """Default positions without the modules a forward pass never calls (none of them: an error)."""
        called = reached(self.backbone_model, positions, pseudo_input)
        if called is None:
            return positions
        if not called:
            raise ValueError(f"{type(self).__name__}: the model calls none of its default positions "
                             f"{positions[:5]} on its pseudo input; pass modified_modules")
        return [p for p in positions if p in called]

    def _unsupported(self, position: str, module: nn.Module, supported: str) -> TypeError:
        return TypeError(
            f"{type(self).__name__} cannot modify {position} ({type(module).__name__}); it supports {supported}. "
            "Choose other modified_modules or add exclude_modules."
        )

    # -------------------------------------------------------------------------------------------- lifecycle
    def _free_name(self) -> str:
        # Names of every delta object alive on this backbone, also detached or merged ones: each can come back.
        taken = live.names_on(self.backbone_model) | {n for h in self._hosts.values() for n in routing.attached_names(h)}
        candidates = itertools.chain([self.delta_type], (f"{self.delta_type}_{i}" for i in itertools.count(1)))
        return next(n for n in candidates if n not in taken)

    @_changes_model
    def attach(self) -> DeltaBase:
        """Route the backbone through this delta (again). Returns self."""
        if self.attached:
            raise RuntimeError(f"delta {self.name!r} is already attached")
        if self.backbone_apart:
            raise RuntimeError(f"delta {self.name!r} holds its backbone parameters ({', '.join(self.backbone_apart)}) "
                               "apart from the backbone, for a DeltaBank; load it without keep_backbone_apart to "
                               "attach it")
        done = []
        try:
            for position, host in self._hosts.items():
                routing.attach(host, self.name, self.deltas[position], self.route_at(position), self.order)
                done.append(host)
        except Exception:
            for host in done:
                routing.detach(host, self.name)
            raise
        self.attached = True
        if self._filter_state_dict:
            self._hook_state_dict()
        return self

    @_changes_model
    def detach(self) -> DeltaBase:
        """Take this delta off; the backbone computes exactly what it did before. Returns self."""
        if self.merged:
            self.unmerge()
        if not self.attached:
            raise RuntimeError(f"delta {self.name!r} is not attached")
        for host in self._hosts.values():
            routing.detach(host, self.name)
        self.attached = False
        if self._state_dict_hook is not None:
            self._state_dict_hook.remove()
            self._state_dict_hook = None
        return self

    # --------------------------------------------------------------------------------------------- training
    def delta_parameters(self) -> list[nn.Parameter]:
        """This delta's parameters, each once (a method may share one tensor across positions)."""
        return list(self.parameters())

    def num_delta_parameters(self) -> int:
        return sum(sharding.full_numel(p) for p in self.delta_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad: this delta's and any backbone parameter left trainable."""
        params = {id(p): p for p in self.backbone_model.parameters() if p.requires_grad}
        params.update({id(p): p for p in self.delta_parameters() if p.requires_grad})
        return list(params.values())

    def num_trainable_parameters(self) -> int:
        return sum(sharding.full_numel(p) for p in self.trainable_parameters())

    def freeze_module(self, exclude: list[str] | None = None, set_state_dict: bool = True) -> DeltaBase:
        """Freeze the backbone except this delta (``"deltas"``) and the modules named in ``exclude``.

        ``exclude`` entries other than ``"deltas"`` address backbone modules like ``modified_modules`` (tail name
        or ``"[r]<regex>"``); all their parameters stay trainable and are saved with the delta.  With
        ``set_state_dict`` (the default) the backbone's ``state_dict()`` returns only trainable tensors while this
        delta is attached, so a trainer that saves ``model.state_dict()`` saves only the delta.  Detaching does not
        unfreeze the backbone: :meth:`unfreeze_module` restores what freezing changed.
        """
        exclude = ["deltas"] if exclude is None else list(_as_list(exclude))
        specs = [e for e in exclude if e != "deltas"]
        names = addressable_names(self.backbone_model)
        keep = {n for hits in match_names(names, specs, "freeze_module exclude").values() for n in hits}
        if self._frozen_from is None:  # the flags before the first freeze, for unfreeze_module
            self._frozen_from = {k: p.requires_grad for k, p in self.backbone_model.named_parameters()
                                 if DELTA_SLOT not in k.split(".")}
        self.unfrozen_backbone = []
        for key, param in self.backbone_model.named_parameters():
            parts = key.split(".")
            if DELTA_SLOT in parts:  # other deltas are frozen too; this one's are set below
                param.requires_grad_(False)
                continue
            owners = {".".join(parts[:i]) for i in range(1, len(parts))}
            param.requires_grad_(bool(owners & keep))
            if param.requires_grad:
                self.unfrozen_backbone.append(key)
        for param in self.delta_parameters():  # also when detached or merged
            param.requires_grad_("deltas" in exclude)
        self._filter_state_dict = set_state_dict
        if set_state_dict and self.attached and self._state_dict_hook is None:
            self._hook_state_dict()
        return self

    def unfreeze_module(self) -> DeltaBase:
        """Undo :meth:`freeze_module`: every backbone parameter gets back the ``requires_grad`` it had before, and
        ``state_dict()`` lists all tensors again."""
        if self._frozen_from is None:
            raise RuntimeError(f"delta {self.name!r} has not frozen the backbone")
        parameters = dict(self.backbone_model.named_parameters())
        for key, flag in self._frozen_from.items():
            if key in parameters:
                parameters[key].requires_grad_(flag)
        self._frozen_from, self.unfrozen_backbone, self._filter_state_dict = None, [], False
        if self._state_dict_hook is not None:
            self._state_dict_hook.remove()
            self._state_dict_hook = None
        return self

    def _hook_state_dict(self) -> None:
        def only_trainable(module, state_dict, prefix, local_metadata):
            trainable = {prefix + k for k, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
            left_out = [k for k in state_dict if k.startswith(prefix) and k not in trainable]
            for key in left_out:
                del state_dict[key]
            if left_out and not self._told_subset:  # a model saved from this subset reloads with a random backbone
                self._told_subset = True
                warnings.warn(
                    f"state_dict() holds only the {len(state_dict)} trainable tensors while delta {self.name!r} has "
                    f"frozen the backbone (freeze_module(set_state_dict=True)), {len(left_out)} left out: a model "
                    "saved from it (save_pretrained) reloads with a random backbone. Save the delta with "
                    "save_finetuned(), or call unfreeze_module() before saving the whole model.",
                    DeltaStateDictWarning, stacklevel=2)

        self._state_dict_hook = self.backbone_model.register_state_dict_post_hook(only_trainable)

    # ------------------------------------------------------------------------------------------------ merge
    @_changes_model
    def merge(self, exact: bool = False) -> DeltaBase:
        """Fold the delta into the backbone's weights and remove its hooks (inference at bare-model speed).

        ``W <- W + ΔW`` followed by ``W - ΔW`` in :meth:`unmerge` is not bit-exact in floating point; with
        ``exact=True`` the original tensors are kept and restored instead (costs a copy of the touched weights).
        """
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} is not a weight update and cannot be merged")
        if self.merged:
            raise RuntimeError(f"delta {self.name!r} is already merged")
        if not self.attached:
            raise RuntimeError(f"delta {self.name!r} is detached; attach it before merging")
        if sharding.any_sharded(self.backbone_model):
            raise RuntimeError(f"delta {self.name!r} is on a sharded backbone (FSDP2 or ZeRO-3), whose weights no "
                               "process holds whole: merge offline instead (deltatune merge, docs/distributed.md)")
        hosts = self._hosts
        with torch.no_grad():
            # Each update is made twice, once to check (it may refuse: nothing is changed yet) and once to apply,
            # so no more than one module's update is held at a time: a merge never needs a second copy of the model.
            merge_safety.check(self, exact, {p: list(self.deltas[p].weight_update(host)) for p, host in hosts.items()})
            for position, host in hosts.items():
                state = self._merge_state[position] = {}
                for attr, update in self.deltas[position].weight_update(host).items():
                    current = getattr(host, attr)
                    if current is None:  # e.g. BitFit on a Linear without bias: the merged bias is new
                        setattr(host, attr, nn.Parameter(update.clone(), requires_grad=False))
                        state[attr] = None
                        continue
                    keep = exact or getattr(self.deltas[position], "needs_exact_unmerge", False)
                    state[attr] = current.detach().clone() if keep else "subtract"
                    current.add_(update.to(current.dtype))
                routing.detach(host, self.name)
        self.merged = True
        return self

    @_changes_model
    def unmerge(self) -> DeltaBase:
        """Take the folded delta out of the weights again and restore its hooks."""
        if not self.merged:
            raise RuntimeError(f"delta {self.name!r} is not merged")
        with torch.no_grad():
            for position, host in self._hosts.items():
                updates = self.deltas[position].weight_update(host)
                for attr, saved in self._merge_state.pop(position).items():
                    if saved is None:
                        host.register_parameter(attr, None)  # as the module was built: no such parameter
                    elif isinstance(saved, torch.Tensor):
                        getattr(host, attr).copy_(saved)
                    else:
                        getattr(host, attr).sub_(updates[attr].to(getattr(host, attr).dtype))
                routing.attach(host, self.name, self.deltas[position], self.route_at(position), self.order)
        self.merged = False
        return self

    # ------------------------------------------------------------------------------------------------- info
    def _headline(self) -> list[str]:
        routes = ", ".join(sorted({self.route_at(p).value for p in self.positions}))
        state = "merged" if self.merged else "attached" if self.attached else "detached"
        return [
            f"{type(self).__name__} {self.name!r} ({routes}) on {len(self.positions)} modules "
            f"of {type(self.backbone_model).__name__}, {state}",
            *([f"  default positions for {self.default_positions_of}: {self.config.modified_modules}"
               + (f", slices {slices} of fused q/k/v" if (slices := getattr(self.config, "qkv_slices", None)) else "")]
              if self.default_positions_of else []),
        ]

    def summary(self) -> str:
        total = sum(sharding.full_numel(p) for k, p in self.backbone_model.named_parameters()
                    if DELTA_SLOT not in k.split("."))
        delta = self.num_delta_parameters()
        trainable = self.num_trainable_parameters()
        shown = self.positions if len(self.positions) <= 8 else [*self.positions[:3], "...", *self.positions[-3:]]
        lines = [
            *self._headline(),
            *(f"  {p or '(the model itself)'}" for p in shown),
            f"  backbone parameters:  {total:,}",
            f"  delta parameters:     {delta:,} ({100 * delta / max(total, 1):.4f}% of the backbone)",
            f"  trainable parameters: {trainable:,} ({100 * trainable / max(total + delta, 1):.4f}% of all)",
        ]
        return "\n".join(lines)

    def log(self, *, common_names: bool = True, file: TextIO | None = None, width: int | None = None) -> str:
        """Print the backbone's folded module tree with this delta marked (type, route, shapes) and the totals;
        return it as plain text.  :meth:`summary` lists the positions instead."""
        from .visualization import Visualization

        return Visualization(self.backbone_model).structure_graph(
            common_names=common_names, file=file, width=width, title="\n".join(self._headline()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {len(self.positions)} modules>"

    # ---------------------------------------------------------------------------------------- save and load
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: ``deltas.<position>.<name>`` and ``backbone.<key>`` for unfrozen parameters, detached
        and whole (shards of FSDP2 or ZeRO-3 are gathered: under torch.distributed every rank must call it)."""
        return {key: sharding.full_tensor(t) for key, t in self._live_tensors().items()}

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of :meth:`delta_state_dict` themselves (parameters, maybe shards), to load into."""
        sharding.settle(self.backbone_model)
        tensors = {".".join(filter(None, ("deltas", p, k))): t
                   for p, delta in self.deltas.items() for k, t in delta.state_dict(keep_vars=True).items()}
        backbone = dict(self.backbone_model.named_parameters(remove_duplicate=False))
        tensors.update({f"backbone.{k}": backbone[k] for k in self.unfrozen_backbone})
        tensors.update({f"backbone.{k}": t for k, t in self.backbone_apart.items()})
        return tensors

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor], source: str | os.PathLike = "tensors") -> None:
        """Copy ``tensors`` (keys as in :meth:`delta_state_dict`) into this delta, cast to its dtype; every key, shape
        and kind of dtype is checked first, so a mismatch changes nothing.  ``source`` names them in the error."""
        own = self._live_tensors()
        checkpoint.check_tensors(tensors, own, Path(source))
        checkpoint.refuse_non_finite(tensors, Path(source))
        with torch.no_grad():
            for key, value in own.items():
                sharding.copy_full(value, tensors[key])

    def backbone_fingerprint(self, keep: bool = False) -> dict[str, Any]:
        """What a checkpoint records of the backbone (:func:`backbone_fingerprint.fingerprint`).  ``keep=True``
        takes it now and reuses it while the same parameters are saved with the delta: the backbone is frozen, so it
        holds while an engine shards it or casts it to bf16 for training."""
        with_delta = [*self.unfrozen_backbone, *self.backbone_apart]
        kept = self.__dict__.get("_kept_fingerprint")
        if kept is not None and not keep and kept[0] == with_delta:
            return kept[1]
        taken = backbone_fingerprint.fingerprint(self.backbone_model, with_delta)
        if keep:
            self.__dict__["_kept_fingerprint"] = (with_delta, taken)
        return taken

    def save_finetuned(self, save_directory: str | os.PathLike) -> Path:
        """Write this delta (and explicitly unfrozen backbone parameters) as a checkpoint folder.

        Under torch.distributed every rank calls it: sharded tensors (FSDP2, ZeRO-3) are gathered whole, and only
        rank 0 writes."""
        config = {
            "format_version": checkpoint.FORMAT_VERSION,
            "deltatune_version": checkpoint.library_version(),
            "delta_type": self.delta_type,
            "name": self.name,
            "config": self.config.to_dict(),
            "positions": self.positions,
            "unfrozen_backbone": [*self.unfrozen_backbone, *self.backbone_apart],
            "backbone": self.backbone_fingerprint(),
        }
        tensors = self.delta_state_dict()
        if not sharding.main_process():
            return Path(save_directory)
        return checkpoint.write(save_directory, config, tensors)

    @classmethod
    def from_finetuned(
        cls, finetuned_model_path: str | os.PathLike, backbone_model: nn.Module, **options: Any
    ) -> DeltaBase:
        """Rebuild a saved delta on ``backbone_model`` and attach it (unless ``attach=False``); nothing is attached if
        anything fails.  With ``keep_backbone_apart=True`` (and ``attach=False``) backbone parameters saved with the
        delta (a classification head) are not written into the backbone but kept in ``delta.backbone_apart``, as
        saved (their shapes may differ, e.g. another number of labels), for a :class:`~deltatune.DeltaBank`."""
        folder = Path(finetuned_model_path)
        saved = checkpoint.read_config(folder)
        kind = saved["delta_type"]
        if kind not in DELTA_TYPES:
            raise ValueError(f"{folder} holds a {kind!r} delta; known types: {', '.join(sorted(DELTA_TYPES))}")
        method = DELTA_TYPES[kind]
        if cls is not DeltaBase and method is not cls:
            raise TypeError(f"{folder} holds a {kind!r} delta, not {cls.delta_type!r}; use {method.__name__}")
        apart = options.pop("keep_backbone_apart", False)
        backbone_fingerprint.check_backbone(saved, backbone_model, folder, heads_apart=apart)
        # Only declared hyper-parameters come from the file (checked as the constructor checks them); constructor
        # keywords such as name, attach or interactive_modify come only from the caller.
        hyperparameters = method.config_class.from_dict(saved["config"]).to_dict()
        live.refuse_second_copy(backbone_model, folder, options)
        unfrozen = saved.get("unfrozen_backbone", [])
        refuse_missing_parameters(backbone_model, unfrozen, folder)
        tensors = checkpoint.read_tensors(folder)
        attach = options.pop("attach", True)
        refuse_apart_attached(apart, attach)
        delta = method(backbone_model, positions=saved["positions"], attach=False, **{**hyperparameters, **options})
        delta.load_saved(tensors, unfrozen, folder / checkpoint.WEIGHTS_FILE, apart=apart)
        if attach:
            delta.attach()
        live.loaded(delta, folder)
        return delta

    def load_saved(self, tensors: dict[str, torch.Tensor], unfrozen: list[str], source: Path, *, apart: bool) -> None:
        """Load saved ``tensors`` (keys as in :meth:`delta_state_dict`) with the backbone parameters ``unfrozen``
        saved beside the delta: written into the backbone, or with ``apart`` kept as this delta's own
        (``backbone_apart``).  Everything is checked before anything is written."""
        absent = [k for k in unfrozen if f"backbone.{k}" not in tensors]
        if apart and absent:
            raise ValueError(f"{source.parent} lists backbone parameters its weights file does not hold: {absent[:5]}")
        tensors = dict(tensors)
        heads = {k: tensors.pop(f"backbone.{k}") for k in unfrozen} if apart else {}
        checkpoint.refuse_non_finite(heads, source)
        self.unfrozen_backbone = [] if apart else list(unfrozen)
        self.load_delta_state_dict(tensors, source)  # checks the keys and values
        self.backbone_apart = heads


def refuse_missing_parameters(backbone_model: nn.Module, names: list[str], folder: Path) -> None:
    missing = sorted(set(names) - set(dict(backbone_model.named_parameters(remove_duplicate=False))))
    if missing:
        raise ValueError(f"{folder} saved backbone parameters this {type(backbone_model).__name__} lacks: "
                         f"{missing[:5]}")


def refuse_apart_attached(apart: bool, attach: bool) -> None:
    if apart and attach:
        raise ValueError("keep_backbone_apart=True keeps a delta's head out of the backbone, for a DeltaBank; "
                         "pass attach=False with it")


def _as_list(names: str | list[str] | None) -> list[str] | None:
    """A single name where a list is expected means that one name (not its characters)."""
    return [names] if isinstance(names, str) else names
