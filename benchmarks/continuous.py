"""Dynamic against continuous batching in the serving engine, on a stream of requests over 8 LoRAs; one run.

    python -m benchmarks.continuous [--smoke] [--repeats N] [--out benchmarks/results]

SmolLM2-135M with 8 LoRAs(q, v, r=8). 48 greedy requests, each for one of the LoRAs, asking for 4, 8, 16 or 32 new
tokens in turn, arrive one every 0.1 s. The same stream is served by
:class:`deltatune.serve.Engine` with dynamic batching (a batch runs to its longest row; up to 16 rows) and with
continuous batching (rows join at the next step and leave when done; up to 16 rows), alternately, ``--repeats``
times each. Reported: requests per second from the first arrival to the last answer, and the mean and 95th
percentile latency (arrival to answer), medians over the repeats; and whether both modes gave every request the same
tokens. ``--smoke``: a tiny random LLaMA, one repeat (the format only; the test suite runs it).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers as tf

from deltatune import LoraModel, assets
from deltatune.bank.registry import DeltaRegistry
from deltatune.machine import machine

from .mixed import THREADS, _random, _row, arguments, markdown, models, save

REQUESTS, LENGTHS, LORAS = 48, (4, 8, 16, 32), 8


def _serve(engine, prompts: list[list[int]], gap: float) -> tuple[list[float], list[list[int]]]:
    """Submit the stream (one request every ``gap`` s); each request's latency and tokens."""
    from deltatune.serve import Request

    latencies: list[float] = [0.0] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    finished = threading.Semaphore(0)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        time.sleep(max(0.0, start + i * gap - time.perf_counter()))

        def done(out, reason, error, i=i, arrived=time.perf_counter()):
            latencies[i], tokens[i] = time.perf_counter() - arrived, out
            errors.extend([error] if error is not None else [])
            finished.release()
        engine.submit(Request(prompt, f"s{i % LORAS}", LENGTHS[i % len(LENGTHS)], on_done=done))
    for _ in prompts:
        finished.acquire()
    if errors:
        raise errors[0]
    return [time.perf_counter() - start, *latencies], tokens


def main(argv: list[str] | None = None) -> dict:
    args, argv = arguments(__doc__, 3, argv)
    gap = 0.01 if args.smoke else 0.1
    torch.set_num_threads(THREADS)
    setup = models(args.smoke)
    model = setup.decoder()
    tokenizer = tf.AutoTokenizer.from_pretrained(assets.smollm2_135m())
    started = time.perf_counter()
    from deltatune.serve import Engine

    with tempfile.TemporaryDirectory() as tmp:
        registry = DeltaRegistry(model)
        for i in range(LORAS):
            delta = _random(LoraModel(model, ["q_proj", "v_proj"], attach=False, name=f"s{i}"))
            registry.register(f"s{i}", delta.save_finetuned(Path(tmp) / f"s{i}"))
        registry.acquire(registry.names)
        prompts = [tokenizer(f"Request number {i} asks about")["input_ids"] for i in range(REQUESTS)]
        results: dict[str, list[tuple[list[float], list[list[int]]]]] = {"dynamic": [], "continuous": []}
        for _ in range(1 if args.smoke else args.repeats):
            for mode in results:
                engine = Engine(model, tokenizer, registry, max_batch=16, continuous=mode == "continuous")
                results[mode].append(_serve(engine, prompts, gap))
                engine.close()
    same = all(tokens == results["dynamic"][0][1] for runs in results.values() for _, tokens in runs)
    benchmark = (f"{setup.decoder_name} serving {REQUESTS} greedy requests ({'/'.join(map(str, LENGTHS))} tokens) "
                 f"over {LORAS} LoRAs, one every {gap} s")
    rows = []
    for mode, runs in results.items():
        throughput = statistics.median(REQUESTS / times[0] for times, _ in runs)
        mean = statistics.median(statistics.mean(times[1:]) for times, _ in runs)
        p95 = statistics.median(sorted(times[1:])[int(0.95 * REQUESTS) - 1] for times, _ in runs)
        rows.append(_row(benchmark, f"{mode} batching (up to 16 rows)", throughput, "requests/s", mean_latency_s=mean,
                         p95_latency_s=p95))
    dynamic = rows[0]["value"]
    for row in rows:
        row.update(ratio=row["value"] / dynamic, ratio_to="throughput of dynamic batching")
    result = {"machine": machine(" ".join(["python -m benchmarks.continuous", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": rows, "same_tokens": same}
    text = markdown(result, "Dynamic against continuous batching") + "".join(
        f"\n{row['variant']}: 95th percentile latency {row['p95_latency_s']:.2f} s." for row in rows) + (
        f"\n\nBoth modes gave every request the same tokens in every run: {same}.\n")
    return save(args, "continuous", result, text)


if __name__ == "__main__":
    main()
