"""What ``deltatune train`` records beside a delta (``training.json``) so ``eval`` and ``show`` rebuild the same
backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone_fingerprint import POOLING_NAMES
from ..checkpoint import CONFIG_FILE, read_config
from .options import json_object

TRAINING_FILE = "training.json"


def read_run(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """(training record, delta folder) of a run folder."""
    folder = Path(folder)
    if not (folder / TRAINING_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a run folder of deltatune train: it has no {TRAINING_FILE}")
    if not (folder / "delta").is_dir():
        raise FileNotFoundError(f"{folder} holds no trained delta yet ({folder / 'delta'} is missing)")
    return json_object((folder / TRAINING_FILE).read_text(errors="replace"), str(folder / TRAINING_FILE)), \
        folder / "delta"


# The only loading options a run folder may record: a head's labels and what it reads (deltatune.pooling).  A run
# folder someone sends you is untrusted input, so nothing that loads code (trust_remote_code, a code revision) is
# ever taken from it.
RECORDED_OPTIONS = {"num_labels": int, "id2label": dict, "label2id": dict, "pooling": str}


def delta_and_options(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """A delta folder and the ``from_pretrained`` options its backbone needs: a run folder's ``delta/`` and
    recorded options (e.g. the number of labels of its head), or a plain delta folder and the pooling its
    fingerprint records, if any."""
    folder = Path(folder)
    if not (folder / TRAINING_FILE).exists():  # a plain delta folder: its fingerprint may record a pooling
        config = folder / CONFIG_FILE
        saved = read_config(folder)["backbone"].get("pooling") if config.is_file() else None
        return folder, {"pooling": saved} if saved else {}
    record, delta = read_run(folder)
    options = record.get("backbone_options", {})
    source = folder / TRAINING_FILE
    if not isinstance(options, dict):
        raise ValueError(f"{source}: backbone_options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(RECORDED_OPTIONS))
    if unknown:
        raise ValueError(f"{source} sets backbone options {unknown}; a run folder may record only "
                         f"{sorted(RECORDED_OPTIONS)} (options such as trust_remote_code are taken from your own "
                         "command line only, never from a file)")
    wrong = [k for k, kind in RECORDED_OPTIONS.items() if k in options and
             (not isinstance(options[k], kind) or isinstance(options[k], bool))]
    if wrong:
        raise ValueError(f"{source}: backbone options {wrong} have the wrong type (num_labels an integer, "
                         "id2label and label2id mappings, pooling a string)")
    if options.get("pooling", "model") not in POOLING_NAMES:
        raise ValueError(f"{source}: pooling {options['pooling']!r} is neither 'model' nor 'mean'")
    return delta, options


def recorded_lead(record: dict[str, Any], vocabulary: int) -> list[int]:
    """The token ids a label-word run put before each text (a BOS token); none for a run from before they were
    recorded, which put none."""
    lead = record.get("lead_tokens", [])
    if not isinstance(lead, list) or not all(type(t) is int and 0 <= t < vocabulary for t in lead):
        raise ValueError(f"{TRAINING_FILE}: lead_tokens must be a list of token ids below {vocabulary}, not {lead!r}")
    return lead


def backbone_with_delta(spec: str, delta: str | Path) -> tuple[Any, Any]:
    """(backbone, delta) for a command given a backbone and a delta folder: a run folder of deltatune train, a
    deltatune checkpoint, or a PEFT LoRA adapter (on the class its config records, with as many labels as the head
    in its modules_to_save has)."""
    from .. import checkpoint, peft_format
    from ..base import DeltaBase
    from ..loading import backbone_of_checkpoint, load_backbone
    from .serve import labels_of

    folder, options = delta_and_options(delta)
    if (folder / peft_format.CONFIG_FILE).is_file() and not (folder / checkpoint.CONFIG_FILE).is_file():
        labels = labels_of(folder, options, spec)
        heads = {"num_labels": len(labels)} if labels else {}
        model = load_backbone(spec, peft_format.backbone_class(folder), **heads)
        return model, peft_format.from_peft(folder, model)
    model = load_backbone(spec, backbone_of_checkpoint(folder), **options)
    return model, DeltaBase.from_finetuned(folder, model)
