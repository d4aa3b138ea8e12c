"""Name-based addressing: which modules of a backbone a delta modifies.

A spec is either a *tail* name (``"query"`` matches ``encoder.layer.0.attention.self.query``: the full name equals the
spec or ends with ``"." + spec``) or a regular expression written ``"[r]<regex>"``, matched against the full dotted
name, anchored at its end and at a dot boundary (``"[r]layer\\.[0-2]\\.attention\\.self\\.query"``).
Modules inside a delta slot (see :mod:`deltatune.routing`) are never addressable.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

REGEX_PREFIX = "[r]"
DELTA_SLOT = "deltas"  # reserved child name under which delta modules hang on a modified module


def _compile(spec: str) -> re.Pattern[str]:
    if spec.startswith(REGEX_PREFIX):
        body = spec[len(REGEX_PREFIX):]
        try:
            return re.compile(rf"(?:^|.*\.)(?:{body})$")
        except re.error as error:
            raise ValueError(f"invalid regular expression in module spec {spec!r}: {error}") from None
    if not spec or spec.startswith(".") or spec.endswith("."):
        raise ValueError(f"module spec {spec!r} is not a dotted module name; write a regex as '[r]<regex>'")
    return re.compile(rf"(?:^|.*\.){re.escape(spec)}$")


def first_match(specs: Iterable[str], name: str) -> str | None:
    """The first spec that matches the full module name ``name``, or None."""
    return next((spec for spec in specs if _compile(spec).fullmatch(name)), None)


def addressable_names(model: nn.Module) -> list[str]:
    """Full names of the backbone's own modules (excluding the root and anything inside a delta slot)."""
    return [name for name, _ in model.named_modules() if name and DELTA_SLOT not in name.split(".")]


def _closest(spec: str, names: list[str], n: int = 5) -> list[str]:
    tails = {name.rsplit(".", 1)[-1] for name in names}
    key = spec[len(REGEX_PREFIX):] if spec.startswith(REGEX_PREFIX) else spec
    close = difflib.get_close_matches(key, sorted(tails), n=n, cutoff=0.4)
    return close or difflib.get_close_matches(key, names, n=n, cutoff=0.0)


def match_names(names: list[str], specs: Iterable[str], what: str = "modified_modules") -> dict[str, list[str]]:
    """For each spec, the names it matches, in model order. A spec that matches nothing is an error."""
    matched: dict[str, list[str]] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"{what} entries must be strings, got {spec!r} ({type(spec).__name__})")
        pattern = _compile(spec)
        hits = [name for name in names if pattern.fullmatch(name)]
        if not hits:
            suggestions = ", ".join(repr(s) for s in _closest(spec, names))
            raise ValueError(
                f"{what} entry {spec!r} matches no module of the backbone. Closest names: {suggestions}. "
                f"A plain entry matches the end of a dotted name; write a regex as '[r]<regex>'."
            )
        matched[spec] = hits
    return matched


def resolve_positions(
    model: nn.Module, modified_modules: Iterable[str], exclude_modules: Iterable[str] = ()
) -> list[str]:
    """Full module names selected by ``modified_modules`` minus ``exclude_modules``, in model order."""
    modified_modules = list(modified_modules)
    if not modified_modules:
        raise ValueError("modified_modules is empty: name at least one module to modify")
    names = addressable_names(model)
    chosen = {n for hits in match_names(names, modified_modules).values() for n in hits}
    excluded = {n for hits in match_names(names, exclude_modules, "exclude_modules").values() for n in hits}
    positions = [n for n in names if n in chosen and n not in excluded]
    if not positions:
        raise ValueError(f"exclude_modules {list(exclude_modules)} removes every module matched by {modified_modules}")
    return positions
