"""deltatune vs PEFT vs the bare backbone, side by side in one run; writes JSON and a Markdown table.

    python -m benchmarks.compare [--smoke] [--repeats N] [--only training ...] [--out benchmarks/results]

Rows: training step time (LoRA r=8 on q,v; (IA)³; prefix; prompt) against PEFT and full fine-tuning; peak memory
of a training step at batch 1 and 16 (a fresh process each); inference latency (bare, ours unmerged / merged, PEFT
unmerged / merged); checkpoint size; attach / detach / switch latency; construction time.  Medians over repeats,
warm-up excluded, every round running each variant once (interleaved), 2 threads.  ``--smoke`` runs tiny random
models once each, to check the harness and the output format (CI), not the speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltatune.machine import machine

from .models import Setting, quiet, settings
from .report import markdown
from .timing import alternating, interleaved, median_of
from .training import build_training
from .variants import METHODS, ours, peft_model

THREADS = 2
GROUPS = ["training", "memory", "inference", "size", "construction", "switching"]


def row(benchmark: str, setting: str, metric: str, ours: float, peft: float | None, reference: float | None = None,
        reference_is: str = "", note: str = "") -> dict:
    """One result with its ratios: ours ÷ PEFT, and ours ÷ the reference (bare backbone, full fine-tuning, ...).
    ``peft`` is None, and ``note`` says why, when PEFT fails on this setting with the installed versions."""
    return {"benchmark": benchmark, "setting": setting, "metric": metric, "ours": ours, "peft": peft,
            "reference": reference, "reference_is": reference_is, "ours/peft": round(ours / peft, 3) if peft else None,
            "ours/reference": round(ours / reference, 3) if reference else None, "note": note}


def training_steps(setting: Setting, repeats: int, warmup: int) -> list[dict]:
    inputs, rows, full_time = setting.inputs(), [], None
    for method in METHODS:
        variants, note = {"ours": build_training(setting, f"ours-{method}", inputs)}, ""
        try:
            step = build_training(setting, f"peft-{method}", inputs)
            step()  # some failures show only when the model runs
            variants["peft"] = step
        except Exception as error:  # PEFT's own failure on these versions is a result to report, not to hide
            note = f"PEFT fails: {type(error).__name__}: {error}"
        if full_time is None:  # full fine-tuning once, in the first method's rounds
            variants["full"] = build_training(setting, "full", inputs)
        times = interleaved(variants, repeats, warmup)
        full_time = times.get("full", full_time)
        rows.append(row("training step", setting.name, f"{method}, s/step", times["ours"], times.get("peft"),
                        full_time, "full fine-tuning", note))
    return rows


def peak_memory(index: int, setting: Setting, smoke: bool) -> list[dict]:
    rows = []
    for batch in (1, 16):
        measured: dict[str, float] = {}
        for name, variant in (("ours", "ours-lora"), ("peft", "peft-lora"), ("full", "full")):
            command = [sys.executable, "-m", "benchmarks.memory", str(index), variant, str(batch)]
            output = subprocess.run(command + (["--smoke"] if smoke else []), capture_output=True, text=True,
                                    check=True, cwd=Path(__file__).parent.parent).stdout
            measured[name] = json.loads(output.strip().splitlines()[-1])["peak_mb"]
        rows.append(row("peak memory", setting.name, f"LoRA, batch {batch}, MB", measured["ours"], measured["peft"],
                        measured["full"], "full fine-tuning"))
    return rows


@torch.no_grad()
def inference(setting: Setting, repeats: int, warmup: int) -> list[dict]:
    inputs = {k: v for k, v in setting.inputs().items() if k != "labels"}
    bare, mine, theirs = setting.load(), setting.load(), setting.load()
    delta = ours("lora", setting, mine)
    wrapped = peft_model("lora", setting, theirs)
    _randomize_lora(mine, wrapped)
    forward = lambda model: (lambda: model(**inputs))  # noqa: E731
    unmerged = interleaved({"bare": forward(bare), "ours": forward(mine), "peft": forward(wrapped)}, repeats, warmup)
    delta.merge()
    wrapped.merge_adapter()
    merged = interleaved({"bare": forward(bare), "ours": forward(mine), "peft": forward(wrapped)}, repeats, warmup)
    return [row("inference", setting.name, "LoRA unmerged, s/forward", unmerged["ours"], unmerged["peft"],
                unmerged["bare"], "bare backbone"),
            row("inference", setting.name, "LoRA merged, s/forward", merged["ours"], merged["peft"], merged["bare"],
                "bare backbone")]


def _randomize_lora(*models) -> None:
    """Non-zero LoRA B matrices, so no side can skip work on a zero update."""
    for model in models:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.01)


def checkpoint_size(setting: Setting) -> list[dict]:
    mine, theirs = setting.load(), setting.load()
    delta = ours("lora", setting, mine)
    wrapped = peft_model("lora", setting, theirs)
    with tempfile.TemporaryDirectory() as folder:
        size = lambda path: sum(f.stat().st_size for f in Path(path).iterdir())  # noqa: E731
        ours_bytes = size(delta.save_finetuned(Path(folder) / "ours"))
        wrapped.save_pretrained(Path(folder) / "peft")
        peft_bytes = size(Path(folder) / "peft")
    tensors = sum(t.numel() * t.element_size() for t in delta.delta_state_dict().values())
    return [row("checkpoint size", setting.name, "LoRA (+ head), bytes on disk", ours_bytes, peft_bytes, tensors,
                "parameters × 4 bytes")]


def switching(setting: Setting, repeats: int) -> list[dict]:
    model = setting.load()
    first = ours("lora", setting, model, name="first")
    second = ours("lora", setting, model, name="second", attach=False)
    wrapped = peft_model("lora", setting, setting.load(), adapter_name="first")
    wrapped.add_adapter("second", wrapped.peft_config["first"])

    def switch_ours() -> None:
        first.detach()
        second.attach()
        second.detach()
        first.attach()

    def switch_peft() -> None:
        wrapped.set_adapter("second")
        wrapped.set_adapter("first")

    detach, attach = alternating(first.detach, first.attach, repeats)
    disable, enable = alternating(wrapped.base_model.disable_adapter_layers,
                                  wrapped.base_model.enable_adapter_layers, repeats)
    return [row("switching", setting.name, "switch to another LoRA and back, s", median_of(switch_ours, repeats),
                median_of(switch_peft, repeats)),
            row("switching", setting.name, "detach (PEFT: disable the adapter layers), s", detach, disable),
            row("switching", setting.name, "attach (PEFT: enable them again), s", attach, enable)]


def construction(setting: Setting, repeats: int) -> list[dict]:
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for _ in range(repeats):
        for name, build in (("ours", lambda m: ours("lora", setting, m)),
                            ("peft", lambda m: peft_model("lora", setting, m))):
            model = setting.load()
            start = time.perf_counter()
            build(model)
            times[name].append(time.perf_counter() - start)
    middle = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return [row("construction", setting.name, "LoRA incl. probe pass, s", middle["ours"], middle["peft"])]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models, one repeat: checks the format")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these rows (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    quiet()
    repeats, warmup = (1, 0) if args.smoke else (args.repeats, args.warmup)
    command = "python -m benchmarks.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    started, rows = time.time(), []
    for index, setting in enumerate(settings(args.smoke)):
        groups = {
            "training": lambda: training_steps(setting, repeats, warmup),
            "memory": lambda: peak_memory(index, setting, args.smoke),
            "inference": lambda: inference(setting, repeats * 2, warmup),
            "size": lambda: checkpoint_size(setting),
            "construction": lambda: construction(setting, max(1, repeats // 2)),
            "switching": lambda: switching(setting, repeats * 10) if setting.task == "CAUSAL_LM" else [],
        }
        for group in args.only or GROUPS:
            rows += groups[group]()
        print(f"{setting.name} done ({time.time() - started:.0f} s)", file=sys.stderr)
    results = {"machine": machine(command.strip(), THREADS), "seconds": round(time.time() - started, 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "smoke" if args.smoke else "latest" if not args.only else "only-" + "-".join(args.only)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
