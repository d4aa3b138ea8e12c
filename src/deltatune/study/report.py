"""The study's report: ``results.json``, ``report.md`` and ``report.html`` (the same blocks), and PNG figures.

Sections, after the survey (Ding et al. 2022): the overall comparison (its Table 3), peak memory against the batch
size (Fig. 9), convergence (Fig. 6) and combinations of soft prompt, BitFit and adapter (Tables 5–6).  Figures need
matplotlib (the ``plot`` extra); without it the report says so and keeps its tables.
"""

from __future__ import annotations

import collections
import dataclasses
import html
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..training.report import pyplot, write_json, write_text
from .protocol import BUDGETS
from .survey import COMBINATION_AVERAGES, COMBINATION_SOURCE, T5_BASE, T5_BASE_SOURCE

Block = tuple  # ("h1" | "h2" | "p", text) | ("table", header, rows) | ("img", file, alt)


def write_report(out: Path, results: dict[str, Any]) -> None:
    write_json(out / "results.json", results)
    blocks = _blocks(out, results)
    write_text(out / "report.md", "\n".join(_markdown(b) for b in blocks))
    write_text(out / "report.html", _html(blocks, f"Delta-tuning study: {results['backbone']}"))


def _accuracy(entry: dict[str, Any], seeds: int) -> str:
    text = f"{100 * entry['test_mean']:.1f}"
    return text + (f" ± {100 * entry['test_std']:.1f}" if seeds > 1 else "")


def _blocks(out: Path, results: dict[str, Any]) -> list[Block]:
    tasks, methods, table = list(results["tasks"]), results["methods"], results["table"]
    seeds = len(results["seeds"])
    machine = results["machine"]
    blocks: list[Block] = [
        ("h1", f"Delta-tuning study: {results['backbone']} ({_budget(results)})"),
        ("p", f"Objective {results['objective']}"
              + (" (the head reads the tokens' mean)" if results["protocol"].get("pooling") == "mean" else "")
              + f"; {seeds} seed(s); "
              + _rates_used(results["rate_factors"])
              + f"; test accuracy at the best validation point. {results['cells']} cells, "
                f"{results['cpu_seconds'] / 3600:.2f} CPU hours, trained on "
              + "; ".join(f"{name} ({count} cells)" for name, count in results["cell_machines"])
              + f". Report written {machine['date']} on {machine['cpu']} "
                f"({machine['cores']} cores, {machine['threads']} threads), torch {machine['versions']['torch']}, "
                f"transformers {machine['versions']['transformers']}"
              + (f"; `{machine['command']}`." if machine["command"] else ".")),
        *_overall(results, tasks, methods, table, seeds),
        *_memory(out, results),
        *_convergence(out, results, tasks, methods, table),
        *_combinations(results, tasks, table, seeds),
    ]
    return blocks


def _budget(results: dict[str, Any]) -> str:
    """E.g. "full budget" or "full budget; epochs 10 instead of 5": the budget and what the command changed."""
    default = dataclasses.asdict(BUDGETS[results["budget"]])
    changed = [f"{key.replace('_', ' ')} {_count(value)} instead of {_count(default[key])}"
               for key, value in results["protocol"]["budget"].items() if value != default[key]]
    return "; ".join([f"{results['budget']} budget", *changed])


def _count(value: int | None) -> str:
    return "all" if value is None else f"{value:,}"


def _rates_used(factors: dict[str, list[float]]) -> str:
    """E.g. "the learning-rate grid (ft, lora: default ×1/3, ×1 and ×3; prefix: default ×1/9, ×1/3, ×1 and ×3),
    chosen by validation accuracy"."""
    if all(f == [1.0] for f in factors.values()):
        return "each method's default learning rate"
    groups: dict[tuple[float, ...], list[str]] = {}
    for name, f in factors.items():
        groups.setdefault(tuple(f), []).append(name)
    named = "; ".join((f"{', '.join(names)}: " if len(groups) > 1 else "each method's ") + f"default {_factors(f)}"
                      for f, names in groups.items())
    if _grid(factors):
        return f"the learning-rate grid ({named}), chosen by validation accuracy"
    return f"one learning rate per method ({named})"


def _grid(factors: dict[str, list[float]]) -> bool:
    """Whether some method tried more than one rate."""
    return any(len(f) > 1 for f in factors.values())


def _rates_title(factors: dict[str, list[float]]) -> str:
    if _grid(factors):
        return "The learning rate chosen on validation (with the number of seeds that chose it when they differ):"
    return "The learning rate of each method:"


def _chosen_rates(entry: dict[str, Any]) -> str:
    """E.g. "0.001 (2), 0.003 (1)"; one rate alone when every seed chose it."""
    counts = collections.Counter(entry["lrs"])
    if len(counts) == 1:
        return f"{entry['lrs'][0]:g}"
    return ", ".join(f"{lr:g} ({n})" for lr, n in sorted(counts.items()))


def _widened(results: dict[str, Any], method: str, ends: set[str]) -> str:
    """The ``--rates`` option that adds one factor ×3 beyond each grid end ``method`` chose."""
    factors = results["rate_factors"][method]
    wider = [factors[0] / 3] * ("lowest" in ends) + factors + [factors[-1] * 3] * ("highest" in ends)
    return f"--rates {method}={','.join(map(_fraction, wider))}"


def _factors(factors: list[float]) -> str:
    """``[1/3, 1, 3]`` as "×1/3, ×1 and ×3"."""
    named = [f"×{_fraction(f)}" for f in factors]
    return ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]


def _fraction(factor: float) -> str:
    """1/9 as "1/9", as ``--rates`` takes it."""
    return str(Fraction(factor).limit_denominator(1000))


def _overall(results, tasks, methods, table, seeds) -> list[Block]:
    reference = results["reference"]
    header = ["task", "majority", *methods]
    rows = [[f"{task} ({results['tasks'][task]['sizes']})", f"{100 * results['tasks'][task]['majority']:.1f}",
             *(_accuracy(table[task][m], seeds) for m in methods)] for task in tasks]
    rows.append(["average", "", *(f"{100 * results['average'][m]:.1f}" for m in methods)])
    if reference:
        rows.append([f"average − {reference}", "",
                     *(f"{100 * (results['average'][m] - results['average'][reference]):+.1f}" for m in methods)])
    first = tasks[0]
    rows.append(["trainable parameters", "", *(f"{table[first][m]['trainable_parameters']:,}" for m in methods)])
    rows.append(["CPU seconds per cell", "", *(f"{table[first][m]['cpu_seconds']:.0f}" for m in methods)])
    blocks: list[Block] = [("h2", "Overall comparison (the survey's Table 3)"),
                           ("p", "Test accuracy (%) per task and method; trainable parameters include the new "
                                 "classification head; CPU seconds are those of the first task."),
                           ("table", header, rows),
                           ("p", _rates_title(results["rate_factors"])),
                           ("table", ["task", *methods], [[t, *(_chosen_rates(table[t][m]) for m in methods)]
                                                          for t in tasks])]
    edges = [(m, t, table[t][m]["edge"]) for t in tasks for m in table[t] if table[t][m]["edge"]]
    if edges:
        where = "the one seed" if seeds == 1 else f"all {seeds} seeds"
        ends = {m: {end for name, _, end in edges if name == m} for m, _, _ in edges}
        blocks.append(("p", f"Chosen at the same end of the rate grid in {where}, so the best rate may lie beyond it: "
                            + "; ".join(f"{m} on {t} (the {end})" for m, t, end in edges)
                            + ". To try one rate beyond: `"
                            + " ".join(_widened(results, m, e) for m, e in ends.items()) + "`."))
    shared = [t for t in tasks if t in T5_BASE]
    if shared:
        names = sorted({m for t in shared for m in T5_BASE[t]})
        blocks += [("p", f"The survey's T5-base numbers for the tasks shared ({T5_BASE_SOURCE}):"),
                   ("table", ["task", *names], [[t, *(f"{T5_BASE[t].get(m, '')}" for m in names)] for t in shared])]
    else:
        blocks.append(("p", f"The survey's T5-base numbers: {T5_BASE_SOURCE}"))
    return blocks


def _memory(out: Path, results) -> list[Block]:
    points = results["memory"]
    if not points:
        return []
    batches = sorted({p["batch"] for p in points})
    methods = list(dict.fromkeys(p["method"] for p in points))
    peak = {(p["method"], p["batch"]): p["peak_mb"] for p in points}
    reference = "ft" if "ft" in methods else None
    rows = []
    for m in methods:
        cells = []
        for b in batches:
            text = f"{peak[m, b]:,.0f}"
            if reference and m != reference:
                text += f" ({peak[m, b] / peak[reference, b]:.2f}×)"
            cells.append(text)
        rows.append([m, *cells])
    blocks: list[Block] = [("h2", "Peak memory against batch size (the survey's Fig. 9)"),
                           ("p", "Peak resident memory (MB) of three training steps on rows of "
                                 f"{results['protocol']['budget']['max_length']} tokens, in a fresh process per "
                                 "point (weights, activations, gradients, optimizer state)"
                                 + (f"; in brackets, the ratio to {reference}." if reference else ".")),
                           ("table", ["method", *(f"batch {b}" for b in batches)], rows)]
    figure = _plot_memory(out, methods, batches, peak)
    blocks.append(("img", figure, "peak memory against batch size") if figure else _no_figure())
    return blocks


def _convergence(out: Path, results, tasks, methods, table) -> list[Block]:
    blocks: list[Block] = [("h2", "Convergence (the survey's Fig. 6)"),
                           ("p", "Steps run, the step of the best validation accuracy and the first step within 1 "
                                 "point of it, at the chosen rate, mean over the seeds; the figures show validation "
                                 "accuracy against steps at the chosen rate of the first seed, early stopping ending "
                                 "a curve.")]
    rows = [[task, *(f"{e['steps']:.0f} ({e['best_step']:.0f}; {e['near_best_step']:.0f})"
                     for e in (table[task][m] for m in methods))] for task in tasks]
    blocks.append(("table", ["task: steps run (best step; within 1 point of it)", *methods], rows))
    for task in tasks:
        figure = _plot_curves(out, task, {m: table[task][m]["curve"] for m in methods})
        blocks.append(("img", figure, f"validation accuracy against steps, {task}") if figure else _no_figure())
    return blocks


def _combinations(results, tasks, table, seeds) -> list[Block]:
    subsets = results["combinations"]
    if not subsets:
        return []
    parts = results["combined_parts"]
    marks = [[part, *("✓" if part in s.split("+") else "" for s in subsets)] for part in parts]
    rows = [[task, *(_accuracy(table[task][s], seeds) for s in subsets)] for task in tasks]
    rows.append(["average", *(f"{100 * results['average'][s]:.1f}" for s in subsets)])
    rows.append(["trainable parameters", *(f"{table[tasks[0]][s]['trainable_parameters']:,}" for s in subsets)])
    survey = [COMBINATION_AVERAGES.get(s, "") for s in subsets]
    return [("h2", "Combinations (the survey's Tables 5–6)"),
            ("p", "Every subset of soft prompt, BitFit and adapter trained together (each part at its own rate, the "
                  "head at the highest of them; none trains the head alone, or with label words evaluates the model "
                  "as loaded). Test accuracy (%)."),
            ("table", ["", *subsets], [*marks, *rows,
                                       [f"survey: {COMBINATION_SOURCE}", *(str(v) for v in survey)]])]


def _no_figure() -> Block:
    return ("p", "(no figure: matplotlib is not installed; pip install 'deltatune[plot]')")


def _plot_memory(out: Path, methods, batches, peak) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4), constrained_layout=True)
    for m in methods:
        axes.plot(batches, [peak[m, b] for b in batches], "o-", label=m, linewidth=2.2 if m == "ft" else 1.2)
    axes.set(xscale="log", xticks=batches, xticklabels=[str(b) for b in batches], xlabel="batch size",
             ylabel="peak resident memory (MB)", title="memory of a training step")
    axes.legend(fontsize=8)
    name = "memory.png"
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return name


def _plot_curves(out: Path, task: str, curves: dict[str, list]) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4), constrained_layout=True)
    for m, curve in curves.items():
        axes.plot([s for s, _ in curve], [100 * a for _, a in curve], ".-", label=m,
                  linewidth=2.2 if m == "ft" else 1.2)
    axes.set(xlabel="training step", ylabel="validation accuracy (%)", title=task)
    axes.legend(fontsize=8)
    name = f"convergence-{task}.png"
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return name


def _markdown(block: Block) -> str:
    kind = block[0]
    if kind == "h1":
        return f"# {block[1]}\n"
    if kind == "h2":
        return f"## {block[1]}\n"
    if kind == "p":
        return f"{block[1]}\n"
    if kind == "img":
        return f"![{block[2]}]({block[1]})\n"
    header, rows = block[1], block[2]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html(blocks: list[Block], title: str) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            text = html.escape(block[1]).replace("`", "")
            parts.append(f"<{kind}>{text}</{kind}>")
        elif kind == "img":
            parts.append(f'<img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">')
        else:
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
