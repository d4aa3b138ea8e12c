"""The results as a Markdown table, with the machine and the command."""

from __future__ import annotations


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value < 1:
        return f"{value * 1000:.2f} ms" if value < 0.1 else f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['threads']} threads), Python {m['python']}, "
        f"{versions}; `{m['command']}` took {results['seconds']:.0f} s.",
        "",
        "| benchmark | model | what | ours | PEFT | reference | ours ÷ PEFT | ours ÷ reference |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        reference = f"{_number(r['reference'])} ({r['reference_is']})" if r["reference"] else ""
        peft = _number(r["peft"]) if r["peft"] is not None else "fails (note below)"
        lines.append(f"| {r['benchmark']} | {r['setting']} | {r['metric']} | {_number(r['ours'])} | "
                     f"{peft} | {reference} | {_number(r['ours/peft'])} | {_number(r['ours/reference'])} |")
    notes = [f"- {r['setting']}, {r['metric']}: {r['note']}" for r in results["rows"] if r.get("note")]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"
