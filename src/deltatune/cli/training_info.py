"""What ``deltatune train`` records beside a delta so ``eval`` and ``show`` rebuild the same backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAINING_FILE = "training.json"


def backbone_options(folder: str | Path) -> dict[str, Any]:
    """``from_pretrained`` options the delta's backbone needs (e.g. the number of labels of its head)."""
    path = Path(folder) / TRAINING_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("backbone_options", {})
