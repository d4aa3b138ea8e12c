"""Delta configurations: dataclasses that round-trip through JSON and reject unknown fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C", bound="DeltaConfig")


@dataclass
class DeltaConfig:
    """Fields every delta has. Method configs subclass this and add their hyper-parameters."""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"unknown {cls.__name__} field(s) {unknown}; the fields are: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
