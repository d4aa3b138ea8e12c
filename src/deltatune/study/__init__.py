"""``deltatune study``: the Delta Tuning survey's empirical comparison, on any backbone and the built-in tasks.

:mod:`~deltatune.study.protocol` (methods, rate grids, budgets) → :mod:`~deltatune.study.cell` (one cell trained
and evaluated) → :mod:`~deltatune.study.store` (cached cells) → :mod:`~deltatune.study.results` (model selection,
mean ± std) → :mod:`~deltatune.study.report` (Markdown, HTML, figures); :mod:`~deltatune.study.runner` runs them.
"""

from .protocol import BUDGETS, Budget, Method, parse_method
from .runner import Study, run_study

__all__ = ["BUDGETS", "Budget", "Method", "Study", "parse_method", "run_study"]
