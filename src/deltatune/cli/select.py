"""Pick modules to modify on a local web page; prints the chosen full names as a JSON list.

The page is served on 127.0.0.1 only, behind a per-session token; open the printed URL in a browser (on a remote
machine, forward the port over ssh).
"""

from __future__ import annotations

import argparse
import json

from ..loading import load_backbone
from ..selector import select_modules
from .options import parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--delta", default="lora", help="delta type whose parameter count is shown (default lora)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="its options, e.g. lora_r=16")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Submit (default 600)")


def run(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 (a free one) and 65535, got {args.port}")
    model = load_backbone(args.model)
    names = select_modules(model, args.delta, port=args.port, timeout=args.timeout, **parse_overrides(args.set))
    print(json.dumps(names, indent=1))
