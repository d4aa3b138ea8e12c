"""Batch-1 greedy generation with the decoder layers compiled, against the same models uncompiled; one run.

    python -m benchmarks.compiled_generation [--smoke] [--repeats N] [--out benchmarks/results]

SmolLM2-135M, greedy, 32 new tokens after 16, LoRA r=8 on all 7 projections, unmerged: the bare model and a tuned
copy, each with every decoder layer compiled (``layer.compile(dynamic=True)``, inductor), timed interleaved with
the same layers uncompiled. Whole-forward compilation is not timed: it recompiles as the cache grows. Before timing,
each compiled model's tokens are checked against its uncompiled tokens, and the largest logit difference over the
steps is reported. ``--smoke``: a tiny random LLaMA traced by Dynamo without inductor, one repeat (the format and
the check only; the test suite runs it).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from deltatune import LoraModel
from deltatune.machine import machine

from .mixed import ALL_LINEAR, THREADS, _random, _row, arguments, markdown, models, save
from .timing import interleaved


def _layers_compiled(model, backend: str) -> tuple[list, list]:
    """Compile every decoder layer; return the layers and their compiled calls (swapped in and out by the timing)."""
    layers = list(model.model.layers)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return layers, [layer._compiled_call_impl for layer in layers]


def _detached(delta, run):
    delta.detach()
    try:
        return run()
    finally:
        delta.attach()


def main(argv: list[str] | None = None) -> dict:
    args, argv = arguments(__doc__, 6, argv)
    torch.set_num_threads(THREADS)
    # Each layer index and the cache's per-layer state give a graph of their own: 30 layers need more than 8.
    torch._dynamo.config.recompile_limit = 256
    setup = models(args.smoke)
    bare, tuned = setup.decoder(), setup.decoder()
    lora = _random(LoraModel(tuned, ALL_LINEAR, lora_r=8))
    ids, n = torch.randint(3, 1000, (1, 16)), setup.new_tokens
    started = time.perf_counter()

    def greedy(model):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)

    uncompiled = {"bare": greedy(bare), "LoRA": greedy(tuned)}
    with torch.no_grad():  # what the LoRA changes: a compiled graph that dropped it would differ this much
        lora_effect = (tuned(ids).logits - _detached(lora, lambda: tuned(ids).logits)).abs().max().item()
    # The smoke run traces with Dynamo only: inductor needs a C++ compiler, which a test machine may lack.
    backend = "eager" if args.smoke else "inductor"
    compiled = {"bare": _layers_compiled(bare, backend), "LoRA": _layers_compiled(tuned, backend)}
    checks = {}
    for name, model in (("bare", bare), ("LoRA", tuned)):
        out, reference = greedy(model), uncompiled[name]  # the first call compiles
        checks[name] = {"same_tokens": torch.equal(out.sequences, reference.sequences),
                        "max_logit_difference": max((a - b).abs().max().item()
                                                    for a, b in zip(out.logits, reference.logits))}

    @contextmanager
    def eager(name):
        layers, _ = compiled[name]
        for layer in layers:
            layer._compiled_call_impl = None
        try:
            yield
        finally:
            for layer, call in zip(*compiled[name]):
                layer._compiled_call_impl = call

    times = interleaved({"bare": (lambda: eager("bare"), lambda: greedy(bare)),
                         "LoRA": (lambda: eager("LoRA"), lambda: greedy(tuned)),
                         "bare, layers compiled": lambda: greedy(bare),
                         "LoRA, layers compiled": lambda: greedy(tuned)},
                        1 if args.smoke else args.repeats, warmup=1)
    benchmark = f"{setup.decoder_name} greedy generation, batch 1, LoRA r=8 on all 7 projections"
    rows = [_row(benchmark, name, t / n * 1000, "ms/token", t / times["bare"], "bare model uncompiled")
            for name, t in times.items()]
    result = {"machine": machine(" ".join(["python -m benchmarks.compiled_generation", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": rows, "compiled_vs_uncompiled": checks,
              "lora_effect_on_logits": lora_effect}
    text = markdown(result, "Batch-1 generation with compiled decoder layers") + "".join(
        f"\n{model}, layers compiled against uncompiled: same tokens {check['same_tokens']}, logits within "
        f"{check['max_logit_difference']:.2g} at every step.\n" for model, check in checks.items())
    return save(args, "compiled_generation", result, text)


if __name__ == "__main__":
    main()
