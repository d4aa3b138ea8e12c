"""Delta configurations: dataclasses that round-trip through JSON, reject unknown fields and check every value.

Each field is checked against its declared type (``int`` is not ``bool``, a ``float`` must be finite, ``list[str]``
holds only strings) and, when declared with :func:`hyper`, against its range or choices.  The same check runs for
constructor arguments and for a loaded checkpoint's ``config``, so a hand-edited file cannot smuggle in a value the
constructor would refuse.  (A dozen lines of checking over ``typing`` hints rather than pydantic: the core stays on
torch, transformers, safetensors and rich, and configs stay plain dataclasses.)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

C = TypeVar("C", bound="DeltaConfig")
MAX_SIZE = 2**20  # no rank, width or token count of a delta is larger; above it an allocation fails or dwarfs the model


def hyper(default: Any, *, low: float | None = None, high: float | None = None, below: float | None = None,
          above: float | None = None, choices: typing.Iterable[str] | None = None) -> Any:
    """A hyper-parameter field with its allowed values: ``low <= v <= high``, ``above < v < below``, or one of
    ``choices``."""
    bounds = {"low": low, "high": high, "below": below, "above": above,
              "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(key, args[0]) and _conforms(item, args[1])
                                               for key, item in value.items())
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return {"<class 'int'>": "an integer", "<class 'float'>": "a finite number", "<class 'bool'>": "true or false",
            "<class 'str'>": "a string"}.get(text, text)


def _range_problem(value: Any, bounds: dict[str, Any]) -> str | None:
    if value is None:  # an optional field left unset (its type allows None, or the type check refused it)
        return None
    if "choices" in bounds and value not in bounds["choices"]:
        return f"one of {', '.join(bounds['choices'])}"
    checks = {"low": (lambda b: value >= b, ">= {}"), "above": (lambda b: value > b, "> {}"),
              "high": (lambda b: value <= b, "<= {}"), "below": (lambda b: value < b, "< {}")}
    bounds = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in bounds.items()}  # 1e5: 100000
    failed = [text.format(bounds[key]) for key, (ok, text) in checks.items() if key in bounds and not ok(bounds[key])]
    wanted = [text.format(bounds[key]) for key, (_, text) in checks.items() if key in bounds]
    return " and ".join(wanted) if failed else None


@dataclass
class DeltaConfig:
    """Fields every delta has. Method configs subclass this and add their hyper-parameters."""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if not _conforms(value, hints[spec.name]):
                raise TypeError(f"{spec.name} must be {_describe(hints[spec.name])}, got {value!r} "
                                f"({type(value).__name__})")
            wanted = _range_problem(value, dict(spec.metadata)) if spec.metadata else None
            if wanted:
                raise ValueError(f"{spec.name} must be {wanted}, got {value!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        if not isinstance(values, dict):
            raise TypeError(f"a {cls.__name__} is a mapping of field names to values, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"unknown {cls.__name__} field(s) {unknown}; the fields are: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
