"""The Python API in a hand-written loop: LoRA on MiniLM-L6 for Rotten Tomatoes, accuracy before and after.

    python examples/quickstart.py [--train 6000] [--epochs 1] [--out out/quickstart]

(``deltatune train`` does the same with early stopping, resumption and metrics files.)  Only the LoRA matrices on
query/value and the classification head are trained; the saved delta is a few hundred kilobytes and reloads onto a
fresh backbone with ``DeltaBase.from_finetuned``.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from deltatune import DeltaBase, LoraModel, assets
from deltatune.training.tasks import rotten_tomatoes


def batches(rows, tokenizer, size: int, max_length: int):
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        encoded = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        yield encoded, torch.tensor([label for _, label in chunk])


@torch.no_grad()
def accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = sum((model(**x).logits.argmax(-1) == y).sum().item() for x, y in batches(rows, tokenizer, 64, max_length))
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=6000, help="training examples to use")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = rotten_tomatoes()
    train, test = task.train[: args.train], task.test
    path = assets.minilm_l6()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    delta.log()
    majority = max(sum(y for _, y in test), sum(1 - y for _, y in test)) / len(test)
    before = accuracy(model, test, tokenizer, args.max_length)

    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=args.lr)
    steps = args.epochs * -(-len(train) // args.batch_size)
    warmup = max(1, steps // 10)  # linear warm-up over 10% of the steps, then linear decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
    start, step = time.time(), 0
    for epoch in range(args.epochs):
        random.Random(args.seed + epoch).shuffle(train)
        model.train()
        for x, y in batches(train, tokenizer, args.batch_size, args.max_length):
            loss = model(**x, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(delta.trainable_parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 25 == 0 or step == steps:
                print(f"epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    after = accuracy(model, test, tokenizer, args.max_length)

    folder = delta.save_finetuned(args.out)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    DeltaBase.from_finetuned(folder, fresh)
    reloaded = accuracy(fresh, test, tokenizer, args.max_length)
    size = sum(f.stat().st_size for f in folder.iterdir())

    print(f"\nRotten Tomatoes ({len(train)} train / {len(test)} test snippets), MiniLM-L6 + LoRA(q,v, r=8)")
    print(f"  majority class          {majority:.1%}")
    print(f"  accuracy before tuning  {before:.1%}")
    print(f"  accuracy after tuning   {after:.1%}   ({time.time() - start:.0f}s of training on CPU)")
    print(f"  reloaded from {folder}  {reloaded:.1%}   (checkpoint {size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
