"""The folded tree as a rich ``Tree``: shapes inline, trainable / frozen / delta parameters in three colours,
deltas marked with their type and route.  A console that is not a terminal gets plain text."""

from __future__ import annotations

from rich.text import Text
from rich.tree import Tree

from .tree import Node, Param

STYLES = {"trainable": "green", "frozen": "grey62", "delta": "bold magenta"}


def _shape(param: Param) -> Text:
    return Text(f"{param.name}:[{','.join(map(str, param.shape))}]", style=STYLES[param.state])


def label(node: Node, show_common: bool) -> Text:
    parts = [Text(node.label, style="bold"), Text(f"({node.kind})", style="cyan")] if node.label else \
        [Text(node.kind, style="bold cyan")]
    parts += [_shape(p) for p in node.params]
    if show_common and node.common:
        parts.append(Text(f"= {','.join(node.common)}", style="yellow"))
    return Text(" ").join(parts)


def _delta_label(delta) -> Text:
    head = Text(f"+ {delta.name} ({delta.kind}, {delta.route})", style=STYLES["delta"])
    return Text(" ").join([head, *(_shape(p) for p in delta.params)])


def rich_tree(root: Node, show_common: bool = False) -> Tree:
    def grow(tree: Tree, node: Node) -> None:
        for delta in node.deltas:
            tree.add(_delta_label(delta))
        for child in node.children:
            grow(tree.add(label(child, show_common)), child)

    tree = Tree(label(root, show_common))
    grow(tree, root)
    return tree
