"""Fold a saved delta into its backbone and write the merged model as a plain transformers checkpoint.

The merge runs in one process, in place (W <- W + ΔW, one module's update at a time), so it holds one copy of the
backbone.  It is how deltas trained on a sharded backbone (FSDP2, ZeRO-3) are merged: their checkpoints hold whole
tensors.  A PEFT LoRA adapter folder merges too, on the class its config records, with its head (modules_to_save).
Only weight updates merge (LoRA, BitFit, (IA)³ on linear layers); adapters, prefixes and soft prompts are refused.
The output folder is written completely or not at all; the backbone's tokenizer is copied into it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import transformers

from .. import pooling
from ..loading import TOKENIZER_FILES, model_path
from .training_info import backbone_with_delta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="asset name, local folder or hub id the delta was trained on")
    parser.add_argument("--delta", type=Path, required=True, metavar="DIR",
                        help="a saved delta, a run folder of deltatune train, or a PEFT LoRA adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder for the merged model (must not exist)")


def run(args: argparse.Namespace) -> Path:
    if args.out.exists() and any(args.out.iterdir()):
        raise FileExistsError(f"{args.out} is not empty; choose another --out")
    model, delta = backbone_with_delta(args.backbone, args.delta)
    if pooling.of(model) == "mean":  # save_pretrained would write a model whose head reads [CLS] again
        raise ValueError(f"{args.delta} was trained with mean pooling, which a transformers checkpoint cannot "
                         "record; use the delta with deltatune eval / serve instead of merging it")
    delta.merge()  # refuses what is not a weight update, before anything changes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_name(f".{args.out.name}.merging")
    shutil.rmtree(staging, ignore_errors=True)  # of an earlier merge that was killed
    model.save_pretrained(staging)
    _copy_tokenizer(args.backbone, staging)
    if args.out.exists():
        args.out.rmdir()  # empty (checked above)
    staging.rename(args.out)
    print(f"merged {delta.delta_type} from {args.delta} into {type(model).__name__}: {args.out}")
    return args.out


def _copy_tokenizer(backbone: str, folder: Path) -> None:
    source = Path(model_path(backbone))
    if source.is_dir() and any((source / name).exists() for name in TOKENIZER_FILES):
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
