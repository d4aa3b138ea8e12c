"""Label words with the head run at the scored positions only, against the head run at every position.

    python -m benchmarks.label_words [--smoke] [--repeats N] [--out benchmarks/results]

SmolLM2-135M with LoRA (q, v, r=8) and the study's batch: 32 Rotten Tomatoes training rows of at most 64 tokens,
written as ``"<text>\\nAnswer: <label word>"``. Each round runs every variant once, rotating the order; the median is
reported:

- a training step (loss, backward, AdamW): deltatune's objective, whose head computes the logits at each row's
  label-word positions only, against transformers' own loss (``labels=``), which computes the logits at every
  position (how the objective computed it before);
- predicting those 32 rows: the logits at each prompt's end only, against every position's logits.

Before timing, the two losses and the two predictions are checked equal. ``--smoke``: a tiny random LLaMA with
SmolLM2's tokenizer, one round (the format only; the test suite runs it).
"""

from __future__ import annotations

import tempfile
import time

import torch
import transformers as tf

from deltatune import LoraModel, assets
from deltatune.machine import machine
from deltatune.training.objectives import LabelWords
from deltatune.training.tasks import load_task

from .mixed import THREADS, _row, arguments, markdown, save
from .timing import interleaved

BATCH, LENGTH = 32, 64


def _tiny_decoder(folder: str) -> str:
    tokenizer = tf.AutoTokenizer.from_pretrained(assets.smollm2_135m())
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
                        ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _every_position(objective: LabelWords, rows, words):
    """The ids, mask and transformers-style labels (the word's tokens, -100 elsewhere) of the same rows."""
    ids, mask, columns, targets = objective.encode(rows, words)
    labels = torch.full_like(ids, -100)
    for i, (row_columns, row_targets) in enumerate(zip(columns, targets)):
        kept = row_targets != -100
        labels[i, row_columns[kept] + 1] = row_targets[kept]  # the logit at c predicts the token at c + 1
    return ids, mask, labels


def main(argv: list[str] | None = None) -> dict:
    args, argv = arguments(__doc__, 10, argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    task = load_task("rotten_tomatoes")
    rows = task.train[:BATCH]
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _tiny_decoder(tmp) if args.smoke else "smollm2-135m"
        objective = LabelWords(backbone, task, LENGTH)
    model = objective.model
    delta = LoraModel(model, ["q_proj", "v_proj"], lora_r=8)
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=1e-3)
    ids, mask, labels = _every_position(objective, rows, [objective.words[label] for _, label in rows])
    prompt_ids, prompt_mask, columns, _ = objective.encode(rows, [[] for _ in rows])
    ends = columns[:, 0]

    def every_position_loss() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def every_position_predict() -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
        return logits[torch.arange(len(rows)), ends][:, objective.first_tokens].argmax(-1)

    def step(loss) -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():  # the same numbers both ways, before anything is timed
        losses = objective.loss(rows).item(), every_position_loss().item()
        same_predictions = torch.equal(objective.predict(rows), every_position_predict())
    if abs(losses[0] - losses[1]) > 1e-5 * abs(losses[1]) or not same_predictions:
        raise RuntimeError(f"the two ways disagree (losses {losses}, same predictions {same_predictions}): not timed")
    variants = {
        "training step, head at the label words (deltatune)": lambda: step(lambda: objective.loss(rows)),
        "training step, head at every position (transformers' loss)": lambda: step(every_position_loss),
        "prediction, head at each prompt's end (deltatune)": lambda: objective.predict(rows),
        "prediction, head at every position": every_position_predict,
    }
    model.train()  # as in training (LoRA has no dropout here, so both losses stay equal)
    times = interleaved(variants, 1 if args.smoke else args.repeats, warmup=1)
    name = "tiny LLaMA" if args.smoke else "SmolLM2-135M"
    result_rows = []
    for kind, unit in (("training step", "s/step"), ("prediction", "s/batch")):
        reference = [times[n] for n in variants if n.startswith(kind)][-1]
        benchmark = f"{name}, LoRA (q, v, r=8), {kind}, {BATCH} rows of up to {LENGTH} tokens"
        result_rows += [_row(benchmark, n.split(", ", 1)[1], times[n], unit, times[n] / reference,
                             "head at every position") for n in variants if n.startswith(kind)]
    result = {"machine": machine(" ".join(["python -m benchmarks.label_words", *argv]), THREADS),
              "seconds": round(time.perf_counter() - started), "rows": result_rows,
              "loss_kept_vs_every_position": list(losses), "same_predictions": same_predictions}
    text = markdown(result, "Label words: the head at the scored positions only") + (
        f"\nLoss on the timed batch: {losses[0]:.6f} (deltatune) and {losses[1]:.6f} (transformers, every "
        f"position). Same predictions: {same_predictions}.\n")
    return save(args, "label_words", result, text)


if __name__ == "__main__":
    main()
