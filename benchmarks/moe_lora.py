"""LoRA on fused MoE expert weights: ours against PEFT's ``target_parameters`` and the bare model; one run.

    python -m benchmarks.moe_lora [--smoke] [--repeats N] [--out benchmarks/results]

No pretrained MoE checkpoint is available offline, so the backbone is a randomly initialised Mixtral of a realistic
shape for a CPU (hidden 512, 8 experts of width 1,024, top-2, 4 layers, 32,000-token vocabulary). LoRA r=8 on the
experts' ``gate_up_proj`` and ``down_proj`` and on q/v, the same factors in both libraries (PEFT's are copied in
and the outputs checked equal before timing). Timed interleaved: a forward pass (batch 4 × 128 tokens, no grad),
a training step (forward and backward, only the LoRA factors trainable; against ours, as the bare model has nothing
to train) and one greedy decode step at batch 1 after a 128-token prompt (its cache copied outside the timing),
under transformers' default experts implementation. ``--smoke``: a tiny Mixtral, one repeat (the format and the
check only; the test suite runs it).
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext

import torch
import transformers as tf

from deltatune import LoraModel, export_peft
from deltatune.machine import machine

from .mixed import THREADS, _random, _row, arguments, markdown, save
from .timing import interleaved

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _mixtral(smoke: bool) -> tf.MixtralForCausalLM:
    sizes = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
             if smoke else dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                vocab_size=32000))
    torch.manual_seed(0)
    config = tf.MixtralConfig(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, **sizes)
    return tf.MixtralForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    import peft

    args, argv = arguments(__doc__, 10, argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    bare, ours = _mixtral(args.smoke), _mixtral(args.smoke)
    delta = _random(LoraModel(ours, ["experts", "q_proj", "v_proj"], lora_r=8, allow_larger_than_backbone=True))
    with tempfile.TemporaryDirectory() as folder:  # the same factors in PEFT, through the format both read
        export_peft(delta, folder)
        theirs = peft.PeftModel.from_pretrained(_mixtral(args.smoke), folder).eval()
    vocabulary = bare.config.vocab_size
    batch = torch.randint(3, vocabulary, (1, 8) if args.smoke else (4, 128))
    with torch.no_grad():
        equal = (ours(batch).logits - theirs(batch).logits).abs().max().item()
        effect = (ours(batch).logits - bare(batch).logits).abs().max().item()
    cache = {}
    for name, model in (("bare", bare), ("ours", ours), ("PEFT", theirs)):
        with torch.no_grad():
            cache[name] = model(batch[:1], use_cache=True).past_key_values  # a prompt's cache for one decode step
    step_ids = batch[:1, -1:]

    def forward(model):
        with torch.no_grad():
            model(batch)

    def train_step(model):
        model.train()
        model(batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    fresh = {}

    @contextmanager
    def cache_copy(name):  # each step decodes after the prompt alone: a copy of its cache, made untimed
        fresh[name] = copy.deepcopy(cache[name])
        yield

    def decode(name, model):
        with torch.no_grad():
            model(step_ids, past_key_values=fresh[name], use_cache=True)

    for model in (ours, theirs):  # only the LoRA factors train, as in use
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in parameter_name)
    models = {"bare": bare, "ours": ours, "PEFT": theirs}
    rows = []
    repeats = 1 if args.smoke else args.repeats
    shape = "×".join(map(str, batch.shape))
    untimed = {name: (lambda: nullcontext()) for name in models}
    for benchmark, names, reference, setting, run in (  # the bare model has nothing to train: steps against ours
            (f"forward, batch {shape}", models, "bare", untimed, lambda m, n: forward(m)),
            (f"training step (forward + backward), batch {shape}", ["ours", "PEFT"], "ours", untimed,
             lambda m, n: train_step(m)),
            ("greedy decode step, batch 1", models, "bare", {n: (lambda n=n: cache_copy(n)) for n in models},
             lambda m, n: decode(n, m))):
        times = interleaved({name: (setting[name], lambda m=models[name], n=name: run(m, n)) for name in names},
                            repeats, warmup=1)
        rows += [_row(benchmark, name, t * 1000, "ms", t / times[reference], reference) for name, t in times.items()]
    result = {"machine": machine(" ".join(["python -m benchmarks.moe_lora", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": rows,
              "ours_vs_peft_max_logit_difference": equal, "lora_effect_on_logits": effect}
    text = markdown(result, "LoRA on fused MoE expert weights") + (
        f"\nOurs and PEFT's logits, same factors: within {equal:.2g} (the LoRA moves them by up to {effect:.2g}).\n")
    return save(args, "moe_lora", result, text)


if __name__ == "__main__":
    main()
