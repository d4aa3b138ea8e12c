"""What a study runs: methods (with their learning-rate grids) and budgets (how much data, how long, how many seeds).

A method is full fine-tuning (``ft``), one delta type, or a combination of them joined by ``+``
(``soft_prompt+bitfit``); ``none`` trains only the new classification head (and with the label-words objective,
which has no head, evaluates the model as loaded: zero-shot).  Each delta type trains at its
own learning rate and the head with it at the same rate (at the highest of a combination's rates), as a new
head must keep up with what feeds it: on MiniLM-L6 a head at 1e-3 under a soft prompt learned nothing the head
alone did not (docs/study.md).  The grid, after the survey's protocol, is a method's
default rate (its class's ``default_lr``) ×⅓, ×1 and ×3 (other factors on request), chosen by validation accuracy;
a combination's grid point is a factor on every part's default rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..auto import DELTA_TYPES

FULL_FINE_TUNING = "ft"
NO_DELTA = "none"  # no delta: the new classification head alone, or (label words) the model as loaded
HEAD = "head"  # the key of the head's rate in Method.rates
HEAD_LR = 1e-2  # the new classification head trained alone (a linear probe of frozen features)
FULL_FINE_TUNING_LR = 5e-5
GRID_FACTORS = (1 / 3, 1.0, 3.0)


def default_lr(name: str) -> float:
    """A method's default rate: its class's ``default_lr``; ``FULL_FINE_TUNING_LR``; ``HEAD_LR`` for the head."""
    if name == FULL_FINE_TUNING:
        return FULL_FINE_TUNING_LR
    if name == NO_DELTA:
        return HEAD_LR
    return DELTA_TYPES[name].default_lr


COMBINED = ("soft_prompt", "bitfit", "adapter")  # the survey's combination study (its Tables 5 and 6)


@dataclass(frozen=True)
class Method:
    """``parts``: the delta types trained together (none for full fine-tuning and for ``none``)."""

    name: str
    parts: tuple[str, ...]

    @property
    def full(self) -> bool:
        return self.name == FULL_FINE_TUNING

    @property
    def combined(self) -> bool:
        return len(self.parts) > 1

    def learning_rates(self, factors: tuple[float, ...]) -> tuple[float, ...]:
        """The default rate times each factor (for a combination, the factors themselves: each scales every part's
        default), to three significant digits."""
        middle = 1.0 if self.combined else default_lr(self.name)
        return tuple(float(f"{middle * f:.3g}") for f in factors)

    @property
    def default_lr(self) -> float:
        return self.learning_rates((1.0,))[0]

    def rates(self, lr: float) -> dict[str, float]:
        """The learning rate of each part and of the head for the grid point ``lr``."""
        if self.full:
            return {FULL_FINE_TUNING: lr}
        if not self.parts:
            return {HEAD: lr}
        if not self.combined:
            return {self.name: lr, HEAD: lr}
        rates = {part: float(f"{default_lr(part) * lr:.3g}") for part in self.parts}
        return {**rates, HEAD: max(rates.values())}


def parse_method(name: str) -> Method:
    if name in (FULL_FINE_TUNING, NO_DELTA):
        return Method(name, ())
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in DELTA_TYPES]
    if unknown or len(set(parts)) < len(parts):
        raise ValueError(f"unknown or repeated method {name!r}; methods: {FULL_FINE_TUNING}, {NO_DELTA}, "
                         f"{', '.join(sorted(DELTA_TYPES))}, or delta types joined by '+'")
    return Method(name, parts)


def combinations() -> list[Method]:
    """The 8 subsets of soft prompt, BitFit and adapter, the empty one (``none``) first."""
    subsets = [tuple(p for i, p in enumerate(COMBINED) if mask >> i & 1) for mask in range(8)]
    return [parse_method("+".join(s) or NO_DELTA) for s in sorted(subsets, key=len)]


@dataclass(frozen=True)
class Budget:
    """How much each cell trains.  ``None`` counts mean the whole split."""

    name: str
    train_examples: int | None
    eval_examples: int | None  # validation and test each
    epochs: int
    evaluations_per_epoch: int  # validation points (the convergence curve; early stopping counts them)
    patience: int  # evaluations without a better validation accuracy before a cell stops
    seeds: tuple[int, ...]
    rate_factors: tuple[float, ...]  # on each method's default rate, increasing: (1.0,) is the default alone
    batch_size: int = 32
    max_length: int = 64
    method_rate_factors: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (method, factors): its own, not the above

    def __post_init__(self) -> None:
        for name in ("epochs", "evaluations_per_epoch", "patience", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"the budget's {name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_examples", "eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"the budget's {name} must be at least 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("a budget needs at least one seed")
        for factors in (self.rate_factors, *dict(self.method_rate_factors).values()):
            if not factors or factors[0] <= 0 or any(a >= b for a, b in zip(factors, factors[1:])):
                raise ValueError(f"the budget's rate factors must be positive and increasing, got {factors}")

    def factors(self, method: Method) -> tuple[float, ...]:
        return dict(self.method_rate_factors).get(method.name, self.rate_factors)

    def rates(self, method: Method) -> tuple[float, ...]:
        factors = self.factors(method)
        rates = method.learning_rates(factors)
        if len(set(rates)) < len(rates):  # cells are named by their rate to three significant digits
            raise ValueError(f"the rate factors {', '.join(f'{f:g}' for f in factors)} give {method.name} "
                             f"the same rate twice: {', '.join(f'{r:g}' for r in rates)}")
        return rates

    def with_overrides(self, **values) -> Budget:
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


BUDGETS = {
    # Under 30 minutes for 3 tasks × 6 methods on MiniLM-L6 and 2 CPU cores: 1,000 training examples, 3 epochs,
    # the default rate, one seed.
    "quick": Budget("quick", 1000, 500, 3, 2, 3, (0,), (1.0,)),
    # The survey's protocol: every training example, the rate grid, three seeds.
    "full": Budget("full", None, None, 5, 2, 4, (0, 1, 2), GRID_FACTORS),
}
