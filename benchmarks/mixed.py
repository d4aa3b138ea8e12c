"""Many deltas on one backbone, side by side in one run; writes JSON and a Markdown table.

    python -m benchmarks.mixed [--smoke] [--repeats N] [--out benchmarks/results]

1. Encoder forward (MiniLM-L6, batch 16, 128 tokens, eval): one attached LoRA(q, v, r=8) vs a DeltaBank holding 8,
   32 or 128 LoRAs with 16 rows over up to 16 distinct ones, vs PEFT's mixed batches (``adapter_names=``, a loop
   over the adapters in the batch), and the bare backbone.
2. Decoder generation at batch 1 (SmolLM2-135M, greedy, 32 new tokens), LoRA r=8 on all 7 projections, unmerged:
   ours (attached, and routed from a bank) and PEFT's per token, against the bare model; and the bare model with a
   forward hook that changes nothing on each of those projections (the floor of any hook-based method).
3. Switching tasks on that decoder (all-linear LoRA): detaching one delta and attaching another, entering a
   bank's ``route()`` for another delta, and PEFT's ``set_adapter``.
4. Serving 32 greedy requests (8 new tokens) over 8 LoRAs(q, v, r=8): mixed batches of 16, or one of 32
   (:class:`deltatune.serve.Engine`), vs swapping one attached delta per batch (each delta's 4 requests together),
   with the bare backbone run on the same batches as the bound batching alone allows; the mean latency of a
   request (all 32 arrive at once) beside each.
Medians over interleaved repeats, 2 threads.  ``--smoke`` runs tiny random models of the same families, one repeat:
the output format, not speed (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

from deltatune import LoraModel, assets
from deltatune.bank import DeltaBank
from deltatune.bank.registry import DeltaRegistry
from deltatune.machine import machine

from .timing import interleaved

THREADS = 2
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Models:
    encoder_name: str
    encoder: object  # () -> model
    batch: dict
    decoder_name: str
    decoder: object  # () -> model
    new_tokens: int


def models(smoke: bool) -> Models:
    torch.manual_seed(0)
    if smoke:
        encoder = lambda: tf.BertModel(tf.BertConfig(  # noqa: E731
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
        decoder = lambda: tf.LlamaForCausalLM(tf.LlamaConfig(  # noqa: E731
            vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)).eval()
        batch = {"input_ids": torch.randint(3, 128, (16, 16)), "attention_mask": torch.ones(16, 16, dtype=torch.long)}
        return Models("tiny BERT", encoder, batch, "tiny LLaMA", decoder, 4)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 128)), "attention_mask": torch.ones(16, 128, dtype=torch.long)}
    return Models("MiniLM-L6", lambda: tf.AutoModel.from_pretrained(assets.minilm_l6()).eval(), batch, "SmolLM2-135M",
                  lambda: tf.AutoModelForCausalLM.from_pretrained(assets.smollm2_135m(), dtype=torch.float32).eval(),
                  32)


def _random(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return delta


def _row(benchmark: str, variant: str, value: float, unit: str, ratio: float | None = None, to: str = "",
         **extra) -> dict:
    return {"benchmark": benchmark, "variant": variant, "value": value, "unit": unit, "ratio": ratio, "ratio_to": to,
            **extra}


def encoder_rows(setup: Models, repeats: int) -> list[dict]:
    model, batch = setup.encoder(), setup.batch
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
    times.update(peft_rows(setup, repeats))
    reference = times["one LoRA attached"]
    shape = "x".join(map(str, batch["input_ids"].shape))
    return [_row(f"{setup.encoder_name} forward, batch {shape} tokens", name, t, "s", t / reference,
                 "one attached LoRA") for name, t in times.items()]


def peft_rows(setup: Models, repeats: int) -> dict[str, float]:
    import peft

    times, batch = {}, setup.batch
    for n in (8, 32, 128):
        model = setup.encoder()
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


def generation_rows(setup: Models, repeats: int) -> list[dict]:
    import peft

    model = setup.decoder()
    ids, n = torch.randint(3, 1000, (1, 16)), setup.new_tokens
    ours = _random(LoraModel(model, ALL_LINEAR, lora_r=8, attach=False))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
    wrapped = peft.get_peft_model(setup.decoder(), config).eval()

    def greedy(m):
        with torch.no_grad():
            m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    @contextmanager
    def hooked():
        # The floor of any method that runs in forward hooks: a hook that changes nothing, on the same modules.
        hosts = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ALL_LINEAR]
        handles = [m.register_forward_hook(lambda module, args, kwargs, out: out, with_kwargs=True) for m in hosts]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def attached():
        ours.attach()
        try:
            yield
        finally:
            ours.detach()

    bank = DeltaBank(model, {"other": _random(LoraModel(model, ALL_LINEAR, lora_r=8, attach=False)), "ours": ours})
    on_model = lambda: greedy(model)  # noqa: E731
    # Only the generation is timed: hooking, attaching and entering the route are set-up.
    times = interleaved({"bare": on_model, "a forward hook that changes nothing": (hooked, on_model),
                         "ours, LoRA unmerged": (attached, on_model),
                         "ours, from a bank of 2 (route)": (lambda: bank.route(["ours"]), on_model),
                         "PEFT, LoRA unmerged": lambda: greedy(wrapped)},
                        repeats, warmup=1)
    bank.close()
    benchmark = f"{setup.decoder_name} greedy generation, batch 1, LoRA r=8 on all 7 projections"
    return [_row(benchmark, name, t / n * 1000, "ms/token", t / times["bare"], "bare model")
            for name, t in times.items()]


def switching_rows(setup: Models, repeats: int) -> list[dict]:
    import peft

    from .timing import alternating

    model = setup.decoder()
    a, b = (_random(LoraModel(model, ALL_LINEAR, name=n, attach=False)) for n in "ab")
    a.attach()
    attach_switch = alternating(lambda: (a.detach(), b.attach()), lambda: (b.detach(), a.attach()), repeats * 10)
    a.detach()
    bank = DeltaBank(model, {"a": a, "b": b})

    def enter(name):
        with bank.route([name]):
            pass
    enter("a")
    route_switch = alternating(lambda: enter("b"), lambda: enter("a"), repeats * 10)
    bank.close()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
    wrapped = peft.get_peft_model(setup.decoder(), config, adapter_name="a")
    wrapped.add_adapter("b", config)
    peft_switch = alternating(lambda: wrapped.set_adapter("b"), lambda: wrapped.set_adapter("a"), repeats * 10)
    benchmark = f"{setup.decoder_name} switching tasks, all-linear LoRA"
    return [_row(benchmark, variant, sum(pair) / 2 * 1000, "ms") for variant, pair in (
        ("ours: detach one delta, attach another", attach_switch),
        ("ours: a bank's route() for another delta", route_switch),
        ("PEFT: set_adapter", peft_switch))]


def serving_rows(setup: Models, repeats: int, tmp: Path) -> list[dict]:
    from deltatune.serve import Engine, Request

    model = setup.decoder()
    tokenizer = tf.AutoTokenizer.from_pretrained(assets.smollm2_135m())
    registry = DeltaRegistry(model)
    deltas = []
    for i in range(8):
        delta = _random(LoraModel(model, ["q_proj", "v_proj"], attach=False, name=f"s{i}"))
        registry.register(f"s{i}", delta.save_finetuned(tmp / f"s{i}"))
        deltas.append(delta)
    prompts = [tokenizer(f"Request number {i} asks about")["input_ids"] for i in range(32)]
    engine = Engine(model, tokenizer, registry, max_batch=16)
    registry.acquire(registry.names)
    mixed_batches = [list(range(start, start + 16)) for start in (0, 16)]
    one_batch = [list(range(32))]
    swap_batches = [[i for i in range(32) if i % 8 == d] for d in range(8)]
    done: dict[str, list[float]] = {}  # seconds from the start to each request's answer, in the last run

    def timed(name: str, batches: list[list[int]], run_batch) -> None:
        start, done[name] = time.perf_counter(), []
        for k, batch in enumerate(batches):
            run_batch(k, batch)
            done[name] += [time.perf_counter() - start] * len(batch)

    def padded(batch: list[int]) -> dict:
        rows = [prompts[i] for i in batch]
        width = max(map(len, rows))
        return {"input_ids": torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}

    def greedy(batch: list[int]) -> None:
        with torch.no_grad():
            model.generate(**padded(batch), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)

    def swap(k: int, batch: list[int]) -> None:
        deltas[k].attach()
        try:
            greedy(batch)
        finally:
            deltas[k].detach()

    def mixed(k: int, batch: list[int]) -> None:
        engine.generate([Request(prompts[i], f"s{i % 8}", 8) for i in batch])

    variants = {
        "mixed batches of 16 (Engine)": lambda: timed("mixed batches of 16 (Engine)", mixed_batches, mixed),
        "one mixed batch of 32 (Engine, --max-batch 32)": lambda: timed(
            "one mixed batch of 32 (Engine, --max-batch 32)", one_batch, mixed),
        "swap one attached delta per batch of 4": lambda: timed("swap one attached delta per batch of 4",
                                                                swap_batches, swap),
        "bare backbone, batches of 16 (bound)": lambda: timed("bare backbone, batches of 16 (bound)", mixed_batches,
                                                              lambda k, b: greedy(b)),
        "bare backbone, batches of 4 (bound)": lambda: timed("bare backbone, batches of 4 (bound)", swap_batches,
                                                             lambda k, b: greedy(b)),
        "bare backbone, one batch of 32 (bound)": lambda: timed("bare backbone, one batch of 32 (bound)", one_batch,
                                                                lambda k, b: greedy(b))}
    times = interleaved(variants, repeats, warmup=1)
    engine.close()
    reference = times["swap one attached delta per batch of 4"]
    benchmark = f"{setup.decoder_name} serving 32 requests x 8 tokens over 8 LoRAs"
    return [_row(benchmark, name, 32 / t, "requests/s", reference / t, "throughput of swapping",
                 mean_latency_s=sum(done[name]) / len(done[name])) for name, t in times.items()]


def markdown(result: dict, title: str = "Many deltas on one backbone") -> str:
    m = result["machine"]
    lines = [f"# {title}", "",
             f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['threads']} threads), Python {m['python']}, "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; `{m['command']}` took {result['seconds']} s.",
             "",
             "| benchmark | variant | value | ratio | mean latency |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = f"{row['ratio']:.2f} × {row['ratio_to']}" if row["ratio"] is not None else ""
        latency = f"{row['mean_latency_s']:.2f} s" if "mean_latency_s" in row else ""
        lines.append(f"| {row['benchmark']} | {row['variant']} | {row['value']:.4g} {row['unit']} | {ratio} | "
                     f"{latency} |")
    return "\n".join(lines) + "\n"


def arguments(doc: str, repeats: int, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``--smoke``, ``--repeats`` and ``--out``, shared by the benchmarks of this family; and the argv parsed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models, one repeat: the format only")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(argv), argv


def save(args: argparse.Namespace, name: str, result: dict, text: str) -> dict:
    """Write ``OUT/NAME.json`` and ``OUT/NAME.md`` (``NAME-smoke`` for a smoke run), print the text; the result."""
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{name}-smoke" if args.smoke else name
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return result


def main(argv: list[str] | None = None) -> dict:
    args, argv = arguments(__doc__, 10, argv)
    repeats = 1 if args.smoke else args.repeats
    torch.set_num_threads(THREADS)
    setup = models(args.smoke)
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = (encoder_rows(setup, repeats) + generation_rows(setup, max(1, repeats // 2))
                + switching_rows(setup, repeats) + serving_rows(setup, max(1, repeats // 3), Path(tmp)))
    result = {"machine": machine(" ".join(["python -m benchmarks.mixed", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": rows}
    return save(args, "mixed", result, markdown(result))


if __name__ == "__main__":
    main()
