"""The benchmarked models and inputs: real MiniLM-L6 (B=16, L=128) and SmolLM2-135M (B=4, L=256), or tiny random
ones of the same families for the smoke run."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf
from torch import nn


@dataclass
class Setting:
    name: str
    load: Callable[[], nn.Module]  # a fresh backbone, eval mode
    batch: int
    length: int
    vocab: int
    task: str  # "SEQ_CLS" (MiniLM, a new 2-label head) or "CAUSAL_LM"
    lora_modules: dict[str, list[str]]  # ours / peft target names (the same modules)
    ia3: dict[str, list[str]]  # modified / feed-forward modules

    def inputs(self, batch: int | None = None) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        b = batch or self.batch
        ids = torch.randint(5, self.vocab, (b, self.length), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs["labels"] = torch.zeros(b, dtype=torch.long) if self.task == "SEQ_CLS" else ids.clone()
        return inputs


def quiet() -> None:
    """No loading bars or reports on stderr: the table is the output."""
    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()


def _minilm() -> nn.Module:
    from deltatune import assets

    return tf.AutoModelForSequenceClassification.from_pretrained(assets.minilm_l6(), num_labels=2).eval()


def _smollm2() -> nn.Module:
    from deltatune import assets

    return tf.AutoModelForCausalLM.from_pretrained(assets.smollm2_135m(), dtype=torch.float32).eval()


def _cached(load: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Load once, then hand out deep copies (loading from disk is slower and not what is measured)."""
    cache: list[nn.Module] = []

    def fresh() -> nn.Module:
        if not cache:
            torch.manual_seed(0)
            cache.append(load())
        return copy.deepcopy(cache[0])
    return fresh


def _tiny_bert() -> nn.Module:
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2)).eval()


def _tiny_llama() -> nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


BERT_IA3 = {"modified": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}
LLAMA_IA3 = {"modified": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}


def settings(smoke: bool) -> list[Setting]:
    if smoke:
        return [Setting("tiny BERT", _cached(_tiny_bert), 2, 16, 128, "SEQ_CLS", {"q,v": ["query", "value"]},
                        BERT_IA3),
                Setting("tiny LLaMA", _cached(_tiny_llama), 2, 16, 128, "CAUSAL_LM",
                        {"q,v": ["q_proj", "v_proj"]}, LLAMA_IA3)]
    return [Setting("MiniLM-L6", _cached(_minilm), 16, 128, 30522, "SEQ_CLS", {"q,v": ["query", "value"]}, BERT_IA3),
            Setting("SmolLM2-135M", _cached(_smollm2), 4, 256, 49152, "CAUSAL_LM", {"q,v": ["q_proj", "v_proj"]},
                    LLAMA_IA3)]
