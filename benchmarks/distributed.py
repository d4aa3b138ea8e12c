"""Each engine of `deltatune train` on two CPU processes (torchrun, gloo) against one process, on MiniLM-L6.

For each strategy: the largest step-loss difference, the largest difference of the saved delta's tensors and of
the offline-merged model's logits from the single-process run, the peak RSS of each rank, and the wall time of the
whole command.  Dropout is switched off in a copy of the backbone so every run draws the same numbers.

    python -m benchmarks.distributed [--examples 96] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from deltatune import assets
from deltatune.machine import machine

STRATEGIES = ["single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def backbone_without_dropout(work: Path) -> Path:
    folder = work / "minilm-no-dropout"
    shutil.copytree(assets.MODELS["minilm-l6"](), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train(strategy: str, backbone: Path, out: Path, options: list[str], work: Path) -> float:
    extra = []
    if strategy == "deepspeed-zero3":
        (work / "ds.json").write_text(json.dumps(PARTITION_ALL))
        extra = ["--deepspeed-config", str(work / "ds.json")]
    launcher = [sys.executable, "-m", "deltatune"] if strategy == "single" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "deltatune"]
    command = [*launcher, "train", "--backbone", str(backbone), *options, *extra, "--out", str(out)]
    if strategy != "single":
        command += ["--strategy", strategy]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def merged_logits(backbone: Path, run: Path, work: Path) -> torch.Tensor:
    out = work / f"merged-{run.name}"
    subprocess.run([sys.executable, "-m", "deltatune", "merge", "--backbone", str(backbone), "--delta", str(run),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(out)(["a moving, funny film", "dull and far too long"],
                                                            padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).logits


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="training examples (batch 16, one epoch)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    options = ["--max-train-examples", str(args.examples), "--max-eval-examples", "32", "--batch-size", "16",
               "--epochs", "1", "--max-length", "32"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        backbone = backbone_without_dropout(work)
        for strategy in STRATEGIES:
            seconds = train(strategy, backbone, work / strategy, options, work)
            metrics = json.loads((work / strategy / "metrics.json").read_text())
            tensors = load_file(work / strategy / "delta" / "delta_model.safetensors")
            rows.append({"strategy": strategy, "seconds": round(seconds, 1), "metrics": metrics, "tensors": tensors,
                         "logits": merged_logits(backbone, work / strategy, work)})
    reference = rows[0]
    table = []
    for row in rows:
        losses = zip(reference["metrics"]["step_losses"], row["metrics"]["step_losses"])
        table.append({
            "strategy": row["strategy"], "processes": 1 if row["strategy"] == "single" else 2,
            "loss_max_diff": max(abs(a - b) for a, b in losses),
            "delta_max_diff": max((row["tensors"][k] - t).abs().max().item() for k, t in reference["tensors"].items()),
            "merged_logits_max_diff": (row["logits"] - reference["logits"]).abs().max().item(),
            "test_accuracy": row["metrics"]["test"]["accuracy"],
            "parameter_mb_per_rank": row["metrics"]["parameter_mb_per_rank"],
            "peak_rss_mb_per_rank": row["metrics"]["peak_memory_mb_per_rank"], "seconds": row["seconds"]})
    command = "python -m benchmarks.distributed" + (f" --examples {args.examples}" if args.examples != 96 else "")
    result = {"machine": machine(command, threads=1), "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "distributed.md").write_text(markdown(result))
    print(markdown(result))
    return table


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Distributed training parity and memory (MiniLM-L6, LoRA, 2 CPU processes, gloo)", "",
             f"`{m['command']}` on {m['cpu']} ({m['cores']} cores, {m['threads']} thread per process), "
             f"{m['date']}; torch {m['versions']['torch']}, transformers {m['versions']['transformers']}.", "",
             "Differences are from the single-process run on the same global batches (dropout off).", "",
             "| strategy | processes | max step-loss diff | max saved-delta diff | max merged-logit diff | test accuracy "
             "| parameters held per rank (MB) | peak RSS per rank (MB) | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rss = " / ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_rank"])
        held = " / ".join(f"{v:.0f}" for v in r["parameter_mb_per_rank"])
        lines.append(f"| {r['strategy']} | {r['processes']} | {r['loss_max_diff']:.1e} | {r['delta_max_diff']:.1e} "
                     f"| {r['merged_logits_max_diff']:.1e} | {r['test_accuracy']:.1%} | {held} | {rss} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
