"""A Hugging Face ``datasets`` dataset, when the machine is online and the library installed."""

from __future__ import annotations

from .data import Task, fractions, split_off


def hub_task(name: str, text_column: str = "text", label_column: str = "label") -> Task:
    """``name`` is ``path`` or ``path:config``; missing validation/test splits are cut from train (seed 0)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset needs the `datasets` library (pip install datasets) and network access") from None
    path, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(path, config or None)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, ...: say which
        raise ValueError(f"cannot load dataset {name!r}: {error}") from None
    train = loaded["train"]
    for column in (text_column, label_column):
        if column not in train.column_names:
            raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {train.column_names}")
    feature = train.features[label_column]
    labels = list(getattr(feature, "names", None) or sorted({str(v) for v in train[label_column]}))
    index = {label: i for i, label in enumerate(labels)}

    def rows(split):
        return [(str(t), int(v) if hasattr(feature, "names") else index[str(v)])
                for t, v in zip(split[text_column], split[label_column])]

    train_rows = rows(train)
    parts = {s: rows(loaded[s]) for s in ("validation", "test") if s in loaded}
    missing = [s for s in ("validation", "test") if s not in parts]
    if missing:
        *cut, train_rows = split_off(train_rows, fractions(len(train_rows))[: len(missing)])
        parts.update(zip(missing, cut))
    return Task(name, labels, train_rows, parts["validation"], parts["test"], f"datasets: {name}")
