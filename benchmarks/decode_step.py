"""Where batch-1 decoding time goes with a LoRA: one decode step, per variant, interleaved in one run.

    python -m benchmarks.decode_step [--smoke] [--repeats N] [--out benchmarks/results]

SmolLM2-135M, LoRA r=8 on all 7 projections, batch 1: after a 16-token prompt, 16 greedy decode steps are timed one
by one; each round runs every variant (rotating the order) and the median step is reported. Variants:

- the bare model; the bare model with a forward hook that changes nothing on each of those projections;
- the LoRA attached (deltatune's hooks), and merged into the weights (``merge()``);
- a bound that is not in the library: each projection's forward replaced by a function computing ``[W; A] x`` in one
  product and ``h + (α/r)(A x) Bᵀ`` in one ``addmm``, from a concatenated copy of ``W`` and ``A`` made beforehand (so
  it needs a second copy of every adapted weight, and goes stale if ``A`` changes).

Also the cost of merging and unmerging that LoRA (median of alternating calls), and a check that every variant
decodes the attached LoRA's tokens. ``--smoke``: a tiny random LLaMA, one round (the format only; the test suite runs
it).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from deltatune import LoraModel, compat
from deltatune.machine import machine

from .mixed import ALL_LINEAR, THREADS, _random, _row, arguments, markdown, models, save
from .timing import alternating

PROMPT, STEPS = 16, 16
BOUND = "bound, not in the library: [W; A] x from a copy, no hook"


def _concatenated_forward(host, layer):
    """The bound: ``[W; A] x`` from a copy made now, then one ``addmm`` (no hook, no check)."""
    stacked = torch.cat([host.weight.detach(), layer.lora_A.detach()])
    out, r, up, scale = host.out_features, layer.r, layer.lora_B.detach().t(), layer.scaling

    def forward(x):
        both = F.linear(x, stacked).view(-1, out + r)
        return torch.addmm(both[:, :out], both[:, out:], up, alpha=scale).view(*x.shape[:-1], out)
    return forward


def _decode(model, ids, steps: int, samples: list[float] | None = None) -> torch.Tensor:
    """Greedy decoding after ``ids``, one timed forward per step; the tokens."""
    cache = compat.new_cache()
    argument = compat.cache_argument(model)
    with torch.no_grad():
        out = model(ids, use_cache=True, **{argument: cache})
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(steps):
            start = time.perf_counter()
            out = model(tokens[-1], use_cache=True, **{argument: cache})
            if samples is not None:
                samples.append(time.perf_counter() - start)
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def main(argv: list[str] | None = None) -> dict:
    args, argv = arguments(__doc__, 12, argv)
    torch.set_num_threads(THREADS)
    setup = models(args.smoke)
    model = setup.decoder()
    lora = _random(LoraModel(model, ALL_LINEAR, lora_r=8, attach=False))
    ids = torch.randint(3, 1000, (1, PROMPT))
    started = time.perf_counter()

    @contextmanager
    def while_(enter, leave):
        enter()
        try:
            yield
        finally:
            leave()

    hosts = list(lora._hosts.items())
    hook_handles: list = []

    def hook():
        hook_handles[:] = [h.register_forward_hook(lambda m, a, k, o: o, with_kwargs=True) for _, h in hosts]

    def replace():
        for position, host in hosts:
            host.forward = _concatenated_forward(host, lora.deltas[position])

    def restore():
        for _, host in hosts:
            del host.forward

    variants = {
        "bare": nullcontext,
        "a forward hook that changes nothing": lambda: while_(hook, lambda: [h.remove() for h in hook_handles]),
        "LoRA attached": lambda: while_(lora.attach, lora.detach),
        "LoRA merged": lambda: while_(lambda: lora.attach().merge(exact=True), lora.detach),
        BOUND: lambda: while_(replace, restore),
    }
    with torch.no_grad():  # what the LoRA changes: a variant that dropped it would decode other tokens
        bare_logits = model(ids).logits
        with variants["LoRA attached"]():
            reference = _decode(model, ids, STEPS)
            lora_effect = (model(ids).logits - bare_logits).abs().max().item()
    same_tokens = {}
    for name in ("LoRA merged", BOUND):
        with variants[name]():
            same_tokens[name] = torch.equal(_decode(model, ids, STEPS), reference)

    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(1 if args.smoke else args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            with variants[name]():
                _decode(model, ids, STEPS, samples[name])
    step = {name: statistics.median(values) for name, values in samples.items()}

    lora.attach()
    merge, unmerge = alternating(lambda: lora.merge(exact=True), lora.unmerge, 1 if args.smoke else 5)
    lora.detach()

    benchmark = f"{setup.decoder_name} decode step, batch 1, {PROMPT}+ cached tokens, LoRA r=8 on all 7 projections"
    rows = [_row(benchmark, name, t * 1000, "ms/step", t / step["bare"], "bare model", samples=len(samples[name]))
            for name, t in step.items()]
    rows += [_row(f"{setup.decoder_name}, LoRA r=8 on all 7 projections", "merge(exact=True)", merge * 1000, "ms"),
             _row(f"{setup.decoder_name}, LoRA r=8 on all 7 projections", "unmerge()", unmerge * 1000, "ms")]
    result = {"machine": machine(" ".join(["python -m benchmarks.decode_step", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": rows,
              "same_tokens_as_attached": same_tokens, "lora_effect_on_logits": lora_effect}
    text = markdown(result, "Batch-1 decode step with a LoRA") + "".join(
        f"\n{variant}: the attached LoRA's {STEPS + 1} greedy tokens: {same}." for variant, same in
        same_tokens.items()) + "\n"
    return save(args, "decode_step", result, text)


if __name__ == "__main__":
    main()
