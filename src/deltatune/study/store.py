"""The study folder: ``study.json`` (the protocol every cell shares) and one JSON file per finished cell.

A cell's file is written atomically when it finishes, so a killed study loses at most the cells that were running
and continues with the same command.  Adding tasks or methods to a study reuses its cells; changing the protocol
(backbone, objective, budget, delta options) in the same folder is refused, since the cells would not compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..training.report import write_json

PROTOCOL_FILE = "study.json"


def check_protocol(out: Path, protocol: dict[str, Any]) -> None:
    """Refuse a folder that holds another study, or something else; writes nothing (see :func:`record_protocol`)."""
    saved = out / PROTOCOL_FILE
    if saved.exists():
        previous, current = _flat(json.loads(saved.read_text())), _flat(protocol)
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(f"{out} holds a study with other settings ({', '.join(changed)} differ); its cells "
                             "would not compare with these. Choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no study ({PROTOCOL_FILE}); choose another --out")


def record_protocol(out: Path, protocol: dict[str, Any]) -> None:
    """Write ``study.json`` before the study's first result, so a study refused at its start leaves no folder."""
    saved = out / PROTOCOL_FILE
    if not saved.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, protocol)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"budget": {"epochs": 3}}`` as ``{"budget.epochs": 3}``: a refusal names the setting that changed."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _path(out: Path, kind: str, key: str) -> Path:
    return out / kind / (key.replace("/", "__") + ".json")


def load(out: Path, kind: str, key: str) -> dict[str, Any] | None:
    path = _path(out, kind, key)
    return json.loads(path.read_text()) if path.exists() else None


def save(out: Path, kind: str, key: str, record: dict[str, Any]) -> None:
    path = _path(out, kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
