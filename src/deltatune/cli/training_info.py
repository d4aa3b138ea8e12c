"""What ``deltatune train`` records beside a delta (``training.json``) so ``eval`` and ``show`` rebuild the same
backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAINING_FILE = "training.json"


def read_run(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """(training record, delta folder) of a run folder."""
    folder = Path(folder)
    if not (folder / TRAINING_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a run folder of deltatune train: it has no {TRAINING_FILE}")
    if not (folder / "delta").is_dir():
        raise FileNotFoundError(f"{folder} holds no trained delta yet ({folder / 'delta'} is missing)")
    return json.loads((folder / TRAINING_FILE).read_text()), folder / "delta"


def delta_and_options(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """A delta folder and the ``from_pretrained`` options its backbone needs: a run folder's ``delta/`` and
    recorded options (e.g. the number of labels of its head), or a plain delta folder and none."""
    folder = Path(folder)
    if (folder / TRAINING_FILE).exists():
        record, delta = read_run(folder)
        return delta, record.get("backbone_options", {})
    return folder, {}
