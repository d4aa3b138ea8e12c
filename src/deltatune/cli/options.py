"""``key=value`` overrides from a command line, values read as JSON when they parse (``8``, ``true``, ``["q"]``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..pooling import CHOICES as POOLINGS


def add_pooling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pooling", choices=POOLINGS, default="auto",
                        help="what a classifier's head reads: auto (the mean for checkpoints trained to pool by "
                             "mean, such as MiniLM-L6; else the model's own), model (transformers' head: [CLS] "
                             "through the pooler, or a decoder's last token) or mean (docs/pooling.md)")


def check_counts(**counts: int | None) -> None:
    """Each given count (``--max-length`` and the like) is at least 1: 0 or -1 would silently mean "all"."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def json_object(text: str, source: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; an error names ``source`` (an option, a file)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    return options
