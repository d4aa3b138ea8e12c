"""On-disk format of a delta: a folder with ``delta_config.json`` and ``delta_model.safetensors``.

The JSON holds the delta type, its hyper-parameters, the resolved module names (positions), the format and library
versions and a fingerprint of the backbone (:mod:`deltatune.backbone_fingerprint`).  The safetensors file holds
only delta tensors (``deltas.<position>.<name>``) and the backbone parameters the user explicitly unfroze
(``backbone.<state-dict key>``), and in its metadata a copy of the JSON.  A save never leaves half a checkpoint and
never touches other files in the folder: see :func:`write`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Collection
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import sharding

FORMAT_VERSION = 1
CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE = "delta_model.safetensors"


def library_version() -> str:
    try:
        return metadata.version("deltatune")
    except metadata.PackageNotFoundError:
        return "unknown"


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


def read_tensors(folder: str | os.PathLike, weights_file: str = WEIGHTS_FILE,
                 names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's weights file (only ``names``, when given: the others are not read)."""
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
        return {k: t for k, t in loaded.items() if names is None or k in names}
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: {weights_file} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if names is None or key in names}
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


