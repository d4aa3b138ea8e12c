"""Mixed batches and serving many deltas, side by side in one run; writes JSON and a Markdown table.

    python -m benchmarks.mixed [--repeats N] [--out benchmarks/results]

1. MiniLM-L6 forward (batch 16, 128 tokens, eval): one attached LoRA(q, v, r=8) vs a DeltaBank holding 8, 32 or
   128 LoRAs with 16 rows over up to 16 distinct ones, vs PEFT's mixed batches (``adapter_names=``, a loop over
   the adapters in the batch), and the bare backbone.
2. SmolLM2-135M serving 32 greedy requests (8 new tokens) spread over 8 LoRAs(q, v, r=8): mixed batches of 16
   (:class:`deltatune.serve.Engine`) vs swapping one attached delta per batch (each delta's requests together).
Medians over interleaved repeats, 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import transformers as tf

from deltatune import LoraModel, assets
from deltatune.bank import DeltaBank
from deltatune.bank.registry import DeltaRegistry

from .timing import interleaved

THREADS = 2


def _random(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return delta


def minilm_rows(repeats: int) -> list[dict]:
    model = tf.AutoModel.from_pretrained(assets.minilm_l6()).eval()
    batch = {"input_ids": torch.randint(1000, 20000, (16, 128)), "attention_mask": torch.ones(16, 128, dtype=torch.long)}
    deltas = [_random(LoraModel(model, ["query", "value"], attach=False, name=f"d{i}")) for i in range(128)]
    banks = {n: DeltaBank(model, deltas[:n]) for n in (8, 32, 128)}

    def forward():
        with torch.no_grad():
            model(**batch)

    def routed(n: int):
        rows = [f"d{i % min(n, 16)}" for i in range(16)] if n else ["d0"] * 16

        def run():
            with banks[n or 8].route(rows):
                forward()
        return run

    def one_attached():
        deltas[0].attach()
        try:
            forward()
        finally:
            deltas[0].detach()

    variants = {"bare": forward, "one LoRA attached": one_attached, "bank, 1 LoRA in the batch": routed(0),
                **{f"bank of {n}, {min(n, 16)} distinct in the batch": routed(n) for n in (8, 32, 128)}}
    times = interleaved(variants, repeats, warmup=2)
    for bank in banks.values():
        bank.close()
    times.update(peft_rows(repeats, batch))
    reference = times["one LoRA attached"]
    return [{"benchmark": "MiniLM-L6 forward, batch 16 x 128 tokens", "variant": name, "seconds": t,
             "vs one attached LoRA": t / reference} for name, t in times.items()]


def peft_rows(repeats: int, batch: dict) -> dict[str, float]:
    import peft

    times = {}
    for n in (8, 32, 128):
        model = tf.AutoModel.from_pretrained(assets.minilm_l6()).eval()
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
        wrapped = peft.get_peft_model(model, config, adapter_name="d0").eval()
        for i in range(1, n):
            wrapped.add_adapter(f"d{i}", config)
        wrapped.eval()
        names = [f"d{i % min(n, 16)}" for i in range(16)]

        def run(names=names, wrapped=wrapped):
            with torch.no_grad():
                wrapped(**batch, adapter_names=names)
        times[f"PEFT adapter_names, {n} adapters, {min(n, 16)} distinct"] = interleaved({"x": run}, repeats, 1)["x"]
    return times


def serving_rows(repeats: int, tmp: Path) -> list[dict]:
    from deltatune.serve import Engine, Request

    path = assets.smollm2_135m()
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    registry = DeltaRegistry(model)
    deltas = []
    for i in range(8):
        delta = _random(LoraModel(model, ["q_proj", "v_proj"], attach=False, name=f"s{i}"))
        folder = delta.save_finetuned(tmp / f"s{i}")
        registry.register(f"s{i}", folder)
        deltas.append(delta)
    prompts = [tokenizer(f"Request number {i} asks about")["input_ids"] for i in range(32)]
    engine = Engine(model, tokenizer, registry, max_batch=16)
    registry.acquire(registry.names)

    def mixed():
        for start in (0, 16):
            engine.generate([Request(prompts[i], f"s{i % 8}", 8) for i in range(start, start + 16)])

    def swapping():
        for d, delta in enumerate(deltas):
            rows = [prompts[i] for i in range(32) if i % 8 == d]
            width = max(map(len, rows))
            ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            delta.attach()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                               do_sample=False, pad_token_id=tokenizer.eos_token_id)
            delta.detach()

    times = interleaved({"mixed batches of 16 (Engine)": mixed, "swap one attached delta per batch": swapping},
                        repeats, warmup=1)
    engine.close()
    reference = times["swap one attached delta per batch"]
    return [{"benchmark": "SmolLM2-135M, 32 requests x 8 tokens over 8 LoRAs", "variant": name, "seconds": t,
             "requests per second": 32 / t, "throughput vs swapping": reference / t} for name, t in times.items()]


def markdown(result: dict) -> str:
    lines = [f"# Mixed batches and serving ({result['date']})", "", f"`{result['command']}` on {result['machine']}",
             "", "| benchmark | variant | median s | ratio |", "|---|---|---|---|"]
    for row in result["rows"]:
        ratio = row.get("vs one attached LoRA") or row.get("throughput vs swapping")
        label = "× one attached LoRA" if "vs one attached LoRA" in row else "× throughput of swapping"
        lines.append(f"| {row['benchmark']} | {row['variant']} | {row['seconds']:.4f} | {ratio:.2f} {label} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = minilm_rows(args.repeats) + serving_rows(max(3, args.repeats // 3), Path(tmp))
    result = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.mixed " + " ".join(argv or []),
              "machine": f"{platform.machine()}, {THREADS} threads, torch {torch.__version__}, {platform.processor()}",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed.json").write_text(json.dumps(result, indent=1))
    (args.out / "mixed.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
