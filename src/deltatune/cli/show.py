"""Print the folded module tree of a model, or of a model with a saved delta.

MODEL is an asset name (minilm-l6, smollm2-135m), a local folder, or a hub id when online.  With --delta the
backbone class is the one the delta was saved on (a PEFT adapter's: the one its config records), and the delta is
loaded and marked in the tree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..loading import load_backbone
from ..visualization import Visualization
from .options import check_counts
from .training_info import backbone_with_delta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--delta", metavar="DIR",
                        help="a saved delta, a run folder of deltatune train or a PEFT LoRA adapter to show")
    parser.add_argument("--no-common-names", action="store_true", help="hide AutoDelta's common names (q, v, ...)")
    parser.add_argument("--width", type=int, help="line width (default: the terminal's)")
    parser.add_argument("--json", metavar="FILE", help="also write the tree as JSON")
    parser.add_argument("--html", metavar="FILE", help="also write the tree as a standalone HTML page")


def run(args: argparse.Namespace) -> None:
    check_counts(width=args.width)
    for output in filter(None, (args.json, args.html)):  # before anything is printed
        if not Path(output).resolve().parent.is_dir():
            raise FileNotFoundError(f"cannot write {output}: its folder does not exist")
    common = not args.no_common_names
    if args.delta:
        model, delta = backbone_with_delta(args.model, args.delta)
        delta.log(common_names=common, width=args.width)
    else:
        model = load_backbone(args.model)
        Visualization(model).structure_graph(common_names=common, width=args.width)
    if args.json:
        Visualization(model).save_json(args.json)
    if args.html:
        Visualization(model).save_html(args.html)
