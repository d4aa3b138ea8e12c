"""One self-contained HTML page (style, script and data inlined: no network, no CDN) for the tree, read-only as an
export or with the selector's controls."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _inert_json(data: Any) -> str:
    # Inside <script type="application/json">, "</script>" or "<!--" in a module name must not end the element.
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(data: dict[str, Any], scripts: list[str]) -> str:
    script = "\n".join(_static(name) for name in ["tree.js", *scripts])
    return (_static("page.html").replace("/*STYLE*/", _static("style.css"))
            .replace("/*SCRIPT*/", script).replace("/*DATA*/", _inert_json(data)))


def standalone_html(data: dict[str, Any]) -> str:
    return render(data, ["view.js"])


def selector_html(data: dict[str, Any]) -> str:
    return render(data, ["selector.js"])
