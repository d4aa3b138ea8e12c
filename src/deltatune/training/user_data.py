"""A user's own data: CSV or JSON-lines files with a text and a label column, checked line by line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .data import Rows, Task, fractions, split_off


def _records(path: Path) -> tuple[list[dict], list[str]]:
    """(records, column names) of a .csv/.tsv or .jsonl/.json-lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist" if not path.exists() else
                                f"data file {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}, line {line}); convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number} is not a JSON object")
            records.append(record)
        columns = list(dict.fromkeys(k for r in records for k in r))
    elif path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        records, columns = list(reader), list(reader.fieldnames or [])
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    if not records:
        raise ValueError(f"{path} has a header but no rows")
    return records, columns


def _label(value) -> str:
    """A label as text; numbers written differently (``1``, ``1.0``, ``1e0``) are one label, ``1``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def read_pairs(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    records, columns = _records(path)
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns are {columns}. "
                         "Name them with --text-column / --label-column")
    pairs = []
    for number, record in enumerate(records, 1):
        text, label = record.get(text_column), record.get(label_column)
        if text in (None, "") or label in (None, ""):
            raise ValueError(f"{path} row {number} has an empty {text_column!r} or {label_column!r}")
        pairs.append((str(text), _label(label)))
    return pairs


def _indexed(pairs: list[tuple[str, str]], labels: list[str], path: Path) -> Rows:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in pairs if label not in index})
    if unknown:
        raise ValueError(f"{path} has label(s) {unknown[:5]} that the training data does not have ({labels[:10]})")
    return [(text, index[label]) for text, label in pairs]


def file_task(train: Path, validation: Path | None = None, test: Path | None = None,
              text_column: str = "text", label_column: str = "label") -> Task:
    """Labels are the training file's distinct labels, sorted.  Without validation/test files, 10% each is held
    out of the training file (split seed 0)."""
    pairs = read_pairs(train, text_column, label_column)
    labels = sorted({label for _, label in pairs})
    if all(label.lstrip("-").isdigit() for label in labels):
        labels.sort(key=int)  # 0, 1, …, 10 rather than 0, 1, 10
    if len(labels) < 2:
        raise ValueError(f"{train} has a single label {labels}; classification needs at least two")
    rows = _indexed(pairs, labels, train)
    parts = {}
    for name, path in (("validation", validation), ("test", test)):
        if path is not None:
            parts[name] = _indexed(read_pairs(path, text_column, label_column), labels, path)
    held = [n for n in ("validation", "test") if n not in parts]
    if held:
        *cut, rows = split_off(rows, fractions(len(rows))[: len(held)])
        parts.update(zip(held, cut))
    return Task(train.stem, labels, rows, parts["validation"], parts["test"], f"{train.name}")
