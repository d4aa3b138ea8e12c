"""See a model compactly: a folded module tree in the terminal, as JSON, or as a standalone HTML page."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text
from torch import nn

from .terminal import rich_tree
from .totals import Totals
from .tree import Node, build_tree, common_name_map

__all__ = ["Node", "Totals", "Visualization", "build_tree"]


class Visualization:
    """The folded module tree of ``model`` (deltas included, marked) and its parameter totals."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def tree(self, common_names: bool = False) -> Node:
        return build_tree(self.model, common_name_map(self.model) if common_names else None)

    def structure_graph(self, *, common_names: bool = False, file: TextIO | None = None, width: int | None = None,
                        title: str | None = None) -> str:
        """Print the tree and totals (colours on a terminal, plain text otherwise); return the plain text."""
        tree = rich_tree(self.tree(common_names), show_common=common_names)
        lines = [*([Text(title)] if title else []), tree, *map(Text, Totals.of(self.model).lines())]  # no markup
        console = Console(file=file or sys.stdout, width=width, highlight=False)
        plain = Console(file=io.StringIO(), width=console.width, color_system=None, highlight=False)
        plain.print(*lines, sep="\n")
        text = "\n".join(line.rstrip() for line in plain.file.getvalue().splitlines()) + "\n"
        if console.is_terminal:
            console.print(*lines, sep="\n")
        else:  # a pipe or a file: exactly the plain text
            console.file.write(text)
        return text

    def to_json(self, common_names: bool = True) -> dict[str, Any]:
        totals = Totals.of(self.model)
        return {"model": type(self.model).__name__, "totals": totals.__dict__, "tree": self.tree(common_names).to_dict()}

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def save_html(self, path: str | os.PathLike) -> Path:
        """A standalone page (no network): the collapsible tree, rendered by the selector's own script."""
        from ..selector.page import standalone_html

        path = Path(path)
        path.write_text(standalone_html(self.to_json()))
        return path
