"""Shared fixtures: tiny random models of every family (no download) and the real offline assets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as tf
from torch import nn

VOCAB = 96


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    # Positions per delta type for this family (AutoDelta will provide defaults later): a list of
    # modified_modules, or a dict of keyword arguments when the method takes more than positions.
    positions: dict[str, list[str] | dict[str, list[str]]]
    seq2seq: bool = False
    labels: str = "tokens"  # "tokens" for LM heads, "class" for sequence classification


def _bert_like(config_class, model_class):
    def build():
        config = config_class(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, num_labels=2)
        return model_class(config)
    return build


ENCODER_POSITIONS = {
    "lora": ["query", "value"],
    "adapter": ["attention.output", r"[r]layer\.\d+\.output"],
    "bitfit": ["query", "key", "value", "dense", "LayerNorm"],
    "ia3": {"modified_modules": ["key", "value", r"[r]layer\.\d+\.output\.dense"],
            "feedforward_modules": [r"[r]layer\.\d+\.output\.dense"]},
}
DECODER_POSITIONS = {  # LLaMA / OPT / BART naming
    "lora": ["q_proj", "v_proj"],
    "adapter": ["self_attn", "fc2"],
    "bitfit": ["q_proj", "fc1", "final_layer_norm"],
    "ia3": {"modified_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
}

FAMILIES: dict[str, Family] = {
    "bert": Family(_bert_like(tf.BertConfig, tf.BertForSequenceClassification), ENCODER_POSITIONS, labels="class"),
    "roberta": Family(_bert_like(tf.RobertaConfig, tf.RobertaForSequenceClassification), ENCODER_POSITIONS,
                      labels="class"),
    "gpt2": Family(
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=2)),
        {"lora": ["c_attn", "attn.c_proj"], "adapter": ["attn", "mlp"], "bitfit": ["c_attn", "c_proj", "ln_1"],
         "ia3": {"modified_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}},
    ),
    "t5": Family(
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0)),
        {"lora": ["q", "v"], "adapter": ["SelfAttention", "DenseReluDense"], "bitfit": ["q", "v", "o", "wo"],
         "ia3": {"modified_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]}},
        seq2seq=True,
    ),
    "bart": Family(
        lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
        {**DECODER_POSITIONS, "adapter": ["self_attn", "encoder_attn", "fc2"]},
        seq2seq=True,
    ),
    "llama": Family(
        lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)),
        {"lora": ["q_proj", "v_proj", "embed_tokens"], "adapter": ["self_attn", "mlp"],
         "bitfit": ["q_proj", "down_proj", "input_layernorm"],
         "ia3": {"modified_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
    ),
    "opt": Family(
        lambda: tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64)),
        DECODER_POSITIONS,
    ),
}

PARALLEL_POSITIONS = {"bert": ["attention.self", "intermediate"], "roberta": ["attention.self", "intermediate"],
                      "gpt2": ["attn", "mlp"], "t5": ["SelfAttention", "DenseReluDense"], "bart": ["self_attn", "fc2"],
                      "llama": ["self_attn", "mlp"], "opt": ["self_attn", "fc2"]}
for _name, _family in FAMILIES.items():
    _family.positions["parallel_adapter"] = PARALLEL_POSITIONS[_name]
    _family.positions["low_rank_adapter"] = _family.positions["adapter"]
    _family.positions["compacter"] = _family.positions["adapter"]
    _family.positions["soft_prompt"] = {"soft_token_num": 4}
    _family.positions["prefix"] = {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16}


def tiny_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family].build().eval()


def tiny_batch(family: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded row
    spec = FAMILIES[family]
    inputs = {"input_ids": ids, "attention_mask": mask}
    if spec.labels == "class":
        inputs["labels"] = torch.tensor([0, 1] * (batch // 2) + [0] * (batch % 2))
    else:
        inputs["labels"] = ids.clone()
    if spec.seq2seq:
        inputs["decoder_input_ids"] = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
    return inputs


def first_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def full_pass_logits(model: nn.Module, inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """Logits of one forward pass over generated ``sequences`` of a decoder, with the attention mask and the
    positions that ``generate()`` gives left-padded rows (the count of real tokens before each one)."""
    new = sequences.shape[1] - inputs["attention_mask"].shape[1]
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(sequences.shape[0], new)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits


@pytest.fixture(scope="session")
def minilm_path():
    from deltatune import assets

    return assets.minilm_l6()


@pytest.fixture(scope="session")
def smollm2_path():
    from deltatune import assets

    return assets.smollm2_135m()


@pytest.fixture()
def minilm(minilm_path):
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    return tf.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, minilm_path):
    """A 2-layer BERT without dropout (so one process and two see the same numbers), with MiniLM's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    tf.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory, smollm2_path):
    """A 2-layer LLaMA (grouped-query attention, tied embeddings) with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
