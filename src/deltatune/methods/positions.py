"""Room in a model's learned position table for the positions a soft prompt or a prefix adds.

Models with a learned table (BERT, RoBERTa, GPT-2, OPT, BART) fail with an index or size error deep inside their
embeddings when asked for more positions than the table has; these checks say why, in terms of the delta, first.
"""

from __future__ import annotations


def check_room(limit: int | None, needed: int, what: str) -> None:
    """Raise if ``needed`` positions (described by ``what``) do not fit a table of ``limit`` (None: no table)."""
    if limit is not None and needed > limit:
        raise ValueError(f"{what} need {needed} positions, but the model embeds only {limit}: use a shorter "
                         "prompt or prefix, or shorter inputs")
