"""A deltatune delta trained by an unmodified Hugging Face ``Trainer`` (LoRA on MiniLM-L6, SMS spam).

    python examples/hf_trainer.py [--train 512] [--out out/hf_trainer]

The Trainer's checkpoints hold only the trainable tensors (LoRA + the new head), and ``DeltaCheckpointCallback``
writes each one's ``delta/`` folder, which ``DeltaBase.from_finetuned`` loads onto a fresh backbone.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from deltatune import DeltaBase, LoraModel, assets
from deltatune.trainer_callback import DeltaCheckpointCallback
from deltatune.training.tasks import sms_spam


def encoded(rows, tokenizer, max_length: int = 64) -> list[dict]:
    batch = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(batch["input_ids"], batch["attention_mask"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--out", default="out/hf_trainer")
    args = parser.parse_args()

    task, path = sms_spam(), assets.minilm_l6()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    delta = LoraModel(model, ["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)

    trainer = tf.Trainer(
        model=model,
        args=tf.TrainingArguments(output_dir=args.out, per_device_train_batch_size=16, num_train_epochs=1,
                                  learning_rate=1e-3, save_strategy="epoch", report_to=[], use_cpu=True),
        train_dataset=encoded(task.train[: args.train], tokenizer),
        data_collator=tf.DataCollatorWithPadding(tokenizer),
        callbacks=[DeltaCheckpointCallback(delta)],
    )
    trainer.train()

    fresh = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    checkpoint = f"{args.out}/checkpoint-{trainer.state.global_step}/delta"
    DeltaBase.from_finetuned(checkpoint, fresh)
    test = task.test[:200]
    with torch.no_grad():
        inputs = tokenizer([text for text, _ in test], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
        accuracy = (fresh.eval()(**inputs).logits.argmax(-1) == torch.tensor([y for _, y in test])).float().mean()
    print(f"reloaded {checkpoint}: SMS spam accuracy on {len(test)} test messages {accuracy:.1%}")


if __name__ == "__main__":
    main()
