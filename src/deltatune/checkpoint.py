"""On-disk format of a delta: a folder with ``delta_config.json`` and ``delta_model.safetensors``.

The JSON holds the delta type, its hyper-parameters, the resolved module names (positions), the format and library
versions and a fingerprint of the backbone (its class and every parameter/buffer name, shape and dtype; not the
bytes).  The safetensors file holds only delta tensors (``deltas.<position>.<name>``) and the backbone parameters
the user explicitly unfroze (``backbone.<state-dict key>``), and in its metadata a copy of the JSON.  A save never
leaves half a checkpoint and never touches other files in the folder: see :func:`write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import pooling, sharding
from .addressing import DELTA_SLOT

FORMAT_VERSION = 1
CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE = "delta_model.safetensors"


def library_version() -> str:
    try:
        return metadata.version("deltatune")
    except metadata.PackageNotFoundError:
        return "unknown"


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own parameters and buffers by state-dict key, without any delta slot."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t for name, t in named if DELTA_SLOT not in name.split(".")}


def fingerprint(model: nn.Module, saved_with_delta: list[str] = ()) -> dict[str, Any]:
    """Structure: class and every name/shape/dtype.  Weights: a hash of the first 8 values of every parameter,
    enough to tell another checkpoint of the same architecture apart without reading all bytes.  Parameters saved
    with the delta (``saved_with_delta``) are left out of the sample: loading overwrites them."""
    sharding.settle(model)
    tensors = backbone_tensors(model)
    lines = _lines(tensors)
    return {"class": sharding.unwrapped_class(model).__name__, "tensors": len(lines), "sha256": _structure(lines.values()),
            # the structure without what was saved with the delta: a head served apart may have another size
            "body_sha256": _structure(line for k, line in lines.items() if k not in set(saved_with_delta)),
            "weights_sample": _sample(tensors, set(tensors) - set(saved_with_delta)),
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


POOLING_NAMES = {"model": "the model's own head", "mean": "the tokens' mean"}


def _structure(lines) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def write(folder: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
          config_file: str = CONFIG_FILE, weights_file: str = WEIGHTS_FILE, paired: bool = True) -> Path:
    """Write a checkpoint folder so that a crash at any point leaves the old checkpoint or the new one, complete.

    A new folder is written under a temporary name and renamed.  An existing checkpoint folder (one that holds
    ``config_file``, or an empty one; a symlink to one is followed) is updated in place and only its two files
    change: the weights file, which carries a copy of the config in its metadata, is replaced first (the commit
    point), then ``config_file``; :func:`read_config` reads the weights' copy when the two files' ``save_id``
    differ (a crash fell between the two replacements).
    Leftovers of interrupted saves are removed.  Files and folders get the permissions of the user's umask.  Saves
    from several processes to one folder each leave a complete checkpoint (the last one to replace the weights
    wins)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / config_file).exists())):
        raise FileExistsError(f"{folder} exists and is not a delta checkpoint; refusing to overwrite it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder, (config_file, weights_file))
    # safetensors wants contiguous tensors that share no memory.
    tensors = {k: t.detach().contiguous().clone().cpu() for k, t in tensors.items()}
    if paired:  # other formats (PEFT's) keep their files as their readers expect them
        config = {**config, "save_id": os.urandom(8).hex()}  # pairs this config with these weights
    text = json.dumps(config, indent=2) + "\n"
    metadata = {"format": "pt", **({EMBEDDED_CONFIG: text} if paired else {})}
    if folder.is_dir():
        # Staged in a private folder: safetensors writes through a temporary file of its own (``.tmpXXXXXX``)
        # beside its target, which a kill would otherwise leave in the user's folder.
        staging = _staged(folder, weights_file)
        try:
            staging.mkdir()
            save_file(tensors, staging / weights_file, metadata=metadata)
            _write_text(staging / config_file, text)
            _readable(staging / weights_file, staging / config_file)
            for name in (weights_file, config_file):  # the weights first: from then on they hold the new checkpoint
                os.replace(staging / name, folder / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder
    staging = _staged(folder.parent, folder.name)
    try:
        staging.mkdir(mode=0o777)  # less the umask
        save_file(tensors, staging / weights_file, metadata=metadata)
        _write_text(staging / config_file, text)
        _readable(staging / weights_file, staging / config_file)
        staging.rename(folder)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and (folder / config_file).exists():  # another process saved it meanwhile:
            return write(folder, config, tensors, config_file, weights_file, paired)  # update that one in place
        raise
    return folder


EMBEDDED_CONFIG = "deltatune_config"  # key of the config's copy in the weights file's metadata
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-\w+)?$")


def _staged(parent: Path, name: str) -> Path:
    return parent / f".{name}.tmp-{os.getpid()}-{os.urandom(3).hex()}"


def _readable(*paths: Path) -> None:
    """Permissions as any file the user creates (safetensors writes 0600): others may read a shared checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        path.chmod(0o666 & ~umask)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_leftovers(folder: Path, names: tuple[str, ...] = ()) -> None:
    """Temporary files and folders (``.<name>.tmp-<pid>...``) of saves to ``folder`` (a folder, or a file) and to
    ``names`` inside it, whose process is gone (a kill or a crash)."""
    places = [(folder.parent, {folder.name})] + ([(folder, set(names))] if folder.is_dir() else [])
    for parent, targets in places:
        for path in parent.iterdir():
            match = _STAGED.match(path.name)
            if match and match["name"] in targets and not _alive(int(match["pid"])):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier save of this process that was interrupted by an exception
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a delta checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    embedded = _embedded_config(Path(folder) / WEIGHTS_FILE)
    if isinstance(config, dict) and embedded is not None and embedded.get("save_id") != config.get("save_id"):
        warnings.warn(f"{path} belongs to an earlier save than the weights beside it (that save was interrupted); "
                      "using the config saved with the weights", stacklevel=2)
        config = embedded
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; it is not a delta checkpoint")
    for key in ("format_version", "delta_type", "config", "positions", "backbone"):
        if key not in config:
            raise ValueError(f"{path} lacks the field {key!r}; it was not written by deltatune or was edited")
    kinds = {"format_version": int, "delta_type": str, "config": dict, "positions": list, "backbone": dict,
             "unfrozen_backbone": list}
    for key, kind in kinds.items():
        value = config.get(key, [])
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(item, str) for item in value)):
            wanted = "a list of strings" if kind is list else f"a JSON {kind.__name__}"
            raise ValueError(f"{path}: {key!r} must be {wanted}, got {value!r}; the file was edited or is corrupt")
    if config["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {config['format_version']}, newer than this deltatune "
            f"({library_version()}, format {FORMAT_VERSION}); upgrade deltatune"
        )
    return config


def read_tensors(folder: str | os.PathLike, weights_file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    path = Path(folder) / weights_file
    legacy = path.with_suffix(".bin")
    if not path.is_file() and legacy.is_file():
        # A pickled file can run code when loaded: only ever read with weights_only=True (tensors, no objects).
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{legacy} is not a plain tensor file (refused with weights_only=True): {error}") from None
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise ValueError(f"{legacy} does not hold a mapping of names to tensors")
        return dict(loaded)
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: {weights_file} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupt") from None


def _embedded_config(weights: Path) -> dict[str, Any] | None:
    """The config a save stored in its weights file's metadata, if any (and readable: errors are read_tensors')."""
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            text = (handle.metadata() or {}).get(EMBEDDED_CONFIG)
        return json.loads(text) if text else None
    except (SafetensorError, OSError, ValueError):
        return None


def refuse_non_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ValueError(f"{source} holds NaN or infinite values in {broken[:5]}; refusing to load them")


def check_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Every expected key present with its shape and kind, and nothing else.  A floating-point tensor saved in
    another precision is cast to the delta's (which follows its backbone's), unless its values overflow it."""
    problems = [f"missing {k}" for k in expected if k not in loaded]
    problems += [f"unexpected {k}" for k in loaded if k not in expected]
    for k, t in expected.items():
        if k not in loaded:
            continue
        value, dtype = loaded[k], sharding.full_dtype(t)
        if value.shape != sharding.full_shape(t) or (value.dtype != dtype and not (
                value.is_floating_point() and dtype.is_floating_point)):
            problems.append(f"{k}: checkpoint {list(value.shape)} {value.dtype}, delta expects "
                            f"{list(sharding.full_shape(t))} {dtype}")
        elif value.dtype != dtype and torch.isfinite(value).all() and not torch.isfinite(value.to(dtype)).all():
            problems.append(f"{k}: its {value.dtype} values overflow {dtype}, this delta's dtype (its backbone's)")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise ValueError(f"{path} does not fit this backbone and delta:\n  {shown}")


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
