"""The survey's own numbers, shown beside a study's for comparison.

Only numbers whose source could be read are kept here; none is recalled from memory.
"""

from __future__ import annotations

# Ding et al., "Parameter-efficient fine-tuning of large-scale pre-trained language models", Nature Machine
# Intelligence 5 (2023), Table 2: average over 8 GLUE tasks, RoBERTa-large, full data, without manual templates.
# The subsets follow the table's tunable-parameter shares (adapter 1.75%, BitFit 0.09%, prompt 0.003%, ...).  Its
# empty subset (23.7) is zero-shot with the language-model head, not comparable with our trained head: left out.
COMBINATION_SOURCE = "RoBERTa-large, GLUE average (Nature MI 2023, Table 2)"
COMBINATION_AVERAGES = {
    "adapter": 87.4, "bitfit": 86.6, "bitfit+adapter": 87.1, "soft_prompt": 77.7,
    "soft_prompt+adapter": 86.6, "soft_prompt+bitfit": 86.5, "soft_prompt+bitfit+adapter": 87.0,
}

# The survey's Table 3 (T5-base on 100+ tasks, Rotten Tomatoes among them) could not be retrieved on this
# offline machine; rather than recalled figures, the report says so.
T5_BASE_SOURCE = ("the survey's Table 3 (T5-base, arXiv:2203.06904) could not be read offline, so its numbers are "
                  "not shown.")
T5_BASE: dict[str, dict[str, float]] = {}
