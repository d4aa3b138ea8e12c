"""Labelled text for classification: a task is named labels plus fixed train / validation / test rows."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

Rows = list[tuple[str, int]]  # (text, label index)


@dataclass(frozen=True)
class Task:
    name: str
    labels: list[str]  # label index -> name
    train: Rows
    validation: Rows
    test: Rows
    description: str = ""
    label_words: list[str] | None = None  # what a decoder writes for each label (text-to-text); default: labels

    @property
    def words(self) -> list[str]:
        return self.label_words or self.labels

    def split(self, name: str) -> Rows:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; the splits are train, validation, test")
        return getattr(self, name)

    def sizes(self) -> str:
        return f"{len(self.train):,} train / {len(self.validation):,} validation / {len(self.test):,} test"


def subset(task: Task, train: int | None, evaluation: int | None) -> Task:
    """``task`` with only its first ``train`` training rows and ``evaluation`` validation and test rows each
    (None: all)."""
    cut = lambda rows, n: rows[:n] if n else rows  # noqa: E731
    return dataclasses.replace(task, train=cut(task.train, train), validation=cut(task.validation, evaluation),
                               test=cut(task.test, evaluation))


def deduplicate(rows: Rows) -> Rows:
    """One row per text (the first label seen): repeated texts would otherwise sit in train and test at once."""
    seen: dict[str, int] = {}
    for text, label in rows:
        seen.setdefault(text, label)
    return sorted(seen.items())


def split_off(rows: Rows, sizes: list[int], seed: int = 0) -> list[Rows]:
    """Shuffle ``rows`` with ``seed`` and cut ``len(sizes)`` leading parts of those sizes; the rest comes last."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    parts, start = [], 0
    for size in sizes:
        parts.append(rows[start:start + size])
        start += size
    return [*parts, rows[start:]]


def fractions(total: int, validation: float = 0.1, test: float = 0.1) -> list[int]:
    return [max(1, round(total * validation)), max(1, round(total * test))]
