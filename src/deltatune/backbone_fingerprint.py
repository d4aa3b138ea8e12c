"""What a delta checkpoint records of its backbone, and the check made when it is loaded onto one.

The fingerprint holds the backbone's class, a SHA-256 of every parameter/buffer name, shape and dtype (not the bytes),
the same without the parameters saved with the delta (a head served apart may have another size), a hash of the
first 8 values of every other tensor (enough to tell another checkpoint of the same architecture apart without
reading all bytes), and the pooling of a classifier's head.  Loading refuses another class or pooling and warns of
another structure or other weights; the same backbone in another floating-point precision is neither.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import pooling, sharding
from .addressing import DELTA_SLOT

POOLING_NAMES = {"model": "the model's own head", "mean": "the tokens' mean"}


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own parameters and buffers by state-dict key, without any delta slot."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t for name, t in named if DELTA_SLOT not in name.split(".")}


def fingerprint(model: nn.Module, saved_with_delta: list[str] = ()) -> dict[str, Any]:
    """Structure: class and every name/shape/dtype.  Weights: a hash of the first 8 values of every parameter,
    enough to tell another checkpoint of the same architecture apart without reading all bytes.  Parameters saved
    with the delta (``saved_with_delta``) are left out of the sample: loading overwrites them."""
    sharding.settle(model)
    tensors, with_delta = backbone_tensors(model), set(saved_with_delta)
    lines = _lines(tensors)
    return {"class": sharding.unwrapped_class(model).__name__, "tensors": len(lines),
            "sha256": _structure(lines.values()),
            # the structure without what was saved with the delta: a head served apart may have another size
            "body_sha256": _structure(line for k, line in lines.items() if k not in with_delta),
            "weights_sample": _sample(tensors, set(tensors) - with_delta),
            # the head reads the tokens' mean (deltatune.pooling); absent for the model's own pooling, as before
            **({"pooling": "mean"} if pooling.of(model) == "mean" else {})}


def _lines(tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype] | None = None) -> dict[str, str]:
    """``name:shape:dtype`` per tensor; ``dtypes`` overrides some tensors' dtypes."""
    dtypes = dtypes or {}
    return {k: f"{k}:{list(sharding.full_shape(t))}:{dtypes.get(k, t.dtype)}" for k, t in tensors.items()}


def _sample(tensors: dict[str, torch.Tensor], keys, dtypes: dict[str, torch.dtype] | None = None) -> str:
    """A hash of the first 8 values of each tensor in ``keys``, each first cast to its dtype in ``dtypes``."""
    sample = hashlib.sha256()
    for key in sorted(keys):
        first = sharding.full_tensor(tensors[key]).reshape(-1)[:8]  # a shard is gathered (collective)
        if dtypes and key in dtypes:
            first = first.to(dtypes[key])  # rounded as a backbone held in that dtype holds it
        # a copy: numpy() would pin the parameter's storage, which FSDP2 frees and re-allocates
        sample.update(first.to("cpu", torch.float32, copy=True).numpy().tobytes())
    return sample.hexdigest()


def _saved_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor], sha256: str) -> dict[str, torch.dtype] | None:
    """The floating-point dtypes under which ``tensors`` have the structure ``sha256``: the same backbone saved in
    another precision, with its parameters cast and its buffers cast or kept (``from_pretrained(dtype=...)`` keeps
    rotary buffers in float32, ``model.to(dtype)`` casts them).  None if no such cast explains the difference."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    floating = {k for k, t in tensors.items() if t.is_floating_point()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for cast in (floating & parameters, floating):
            dtypes = dict.fromkeys(cast, dtype)
            if _structure(_lines(tensors, dtypes).values()) == sha256:
                return dtypes
    return None


def _as_precise(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether casting ``dtype`` values to ``than`` rounds them as casting their source to ``than`` would."""
    ours, theirs = torch.finfo(dtype), torch.finfo(than)
    return dtype == than or (ours.eps <= theirs.eps and ours.max >= theirs.max)


def _structure(lines) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def check_backbone(saved: dict[str, Any], backbone: nn.Module, folder: Path, heads_apart: bool = False) -> None:
    """Refuse another model class; warn about another structure or other weights.  ``heads_apart``: the
    parameters saved with the delta are not loaded into ``backbone``, so their shapes may differ."""
    expected = saved["backbone"]
    actual = fingerprint(backbone, saved.get("unfrozen_backbone", []))
    heads_apart = heads_apart and "body_sha256" in expected
    if heads_apart:
        expected, actual = {**expected, "sha256": expected["body_sha256"]}, {**actual, "sha256": actual["body_sha256"]}
    if expected.get("class") != actual["class"]:
        raise ValueError(
            f"{folder} was trained on a {expected.get('class')} backbone, this one is {actual['class']}; "
            "load it onto the model class it was trained with"
        )
    saved_pooling, this_pooling = expected.get("pooling", "model"), actual.get("pooling", "model")
    if saved_pooling != this_pooling:
        raise ValueError(
            f"{folder} was trained on a backbone whose classifier pools by {POOLING_NAMES[saved_pooling]}; this "
            f"one pools by {POOLING_NAMES[this_pooling]}. Load the backbone with pooling={saved_pooling!r} "
            "(deltatune.loading.load_backbone, or --pooling)"
        )
    sample = actual["weights_sample"]
    if expected.get("sha256") != actual["sha256"]:
        # The same backbone in another precision is no other structure: its weights are compared as rounded to
        # the saved precision, when this backbone holds them at least as precisely.
        with_delta = set(saved.get("unfrozen_backbone", []))
        tensors = backbone_tensors(backbone)
        body = {k: t for k, t in tensors.items() if not (heads_apart and k in with_delta)}
        dtypes = _saved_dtypes(backbone, body, expected.get("sha256"))
        if dtypes is None:
            warnings.warn(
                f"{folder} was saved with a backbone whose parameter names/shapes/dtypes differ from this "
                f"{actual['class']} ({expected.get('tensors')} vs {actual['tensors']} tensors); every tensor the "
                "delta needs is still checked",
                stacklevel=3,
            )
            return
        if not all(_as_precise(tensors[k].dtype, dtype) for k, dtype in dtypes.items()):
            return  # a coarser copy of the weights cannot be told apart from other weights by its first values
        sample = _sample(tensors, set(tensors) - with_delta, dtypes)
    if expected.get("weights_sample", sample) != sample:
        warnings.warn(
            f"{folder} was saved on a {actual['class']} with the same architecture but other weights; "
            "the delta loads, but was not trained for these weights",
            stacklevel=3,
        )
