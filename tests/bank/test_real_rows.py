"""Mixed batches on real pretrained weights: MiniLM-L6 and SmolLM2-135M, every delta type at its default
positions, each row equal to that row alone with its delta attached."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from deltatune import AutoDeltaModel, DeltaBank

from test_rows import alone, own_outputs

pytestmark = [pytest.mark.real, pytest.mark.compat]

TYPES = ["lora", "adapter", "bitfit", "ia3", "parallel_adapter", "compacter", "low_rank_adapter", "soft_prompt",
         "prefix"]
ROWS = ["a", "b", None, "a"]
TEXTS = ["A wonderful, moving film.", "Dull.", "The match ended in a draw after extra time.", "Who wrote Hamlet?"]
# Absolute, times the largest logit when that is above 1 (SmolLM2's reach 32) -- or, if more, twice what the whole
# batch with the row's delta attached differs from the row alone: matrix products of other shapes round apart
# (the bare SmolLM2's batch of 4 differs from its rows alone by 1e-4).
TOLERANCE = 1e-5


def two_deltas(model, delta_type: str, parallel: list[str] = ()) -> dict:
    deltas = {}
    torch.manual_seed(0)
    for i, name in enumerate("ab"):  # named by type: deltas of a failed case may live on in its traceback
        sizes = {"soft_prompt": {"soft_token_num": 3 + 2 * i},
                 "prefix": {"prefix_token_num": 2 + 2 * i, "reparameterize": False}}.get(delta_type, {})
        if delta_type == "parallel_adapter":  # the default pair form has no row form (tested below)
            sizes = {"modified_modules": parallel}
        delta = AutoDeltaModel.from_config({"delta_type": delta_type, **sizes}, model, attach=False,
                                           name=f"{delta_type}_{name}")
        with torch.no_grad():
            for p in delta.delta_parameters():
                p.add_(torch.randn_like(p) * 0.05)
        deltas[name] = delta
    return deltas


@pytest.fixture(scope="module")
def minilm_classifier(minilm_path):
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    return model, tf.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _own(logits: torch.Tensor, inputs: dict, b: int) -> torch.Tensor:
    """Per token and left-padded: a row's own positions are its last ones (padding attends nowhere)."""
    return logits[:, -int(inputs["attention_mask"][b].sum()):] if logits.dim() == 3 else logits


def _check(model, deltas, inputs, decoder_prompt: bool) -> None:
    bank = DeltaBank(model, deltas)
    try:
        with torch.no_grad(), bank.route(ROWS):
            mixed = model(**inputs).logits
    finally:
        bank.close()
    width = mixed.shape[1] - inputs["input_ids"].shape[1] if decoder_prompt else 0
    for b, name in enumerate(ROWS):
        one = _own(alone(model, deltas, name, {k: v[b:b + 1] for k, v in inputs.items()}), inputs, b)
        whole = alone(model, deltas, name, inputs)[b:b + 1]  # every row with this row's delta: batch-shape round-off
        got = _own(own_outputs(mixed[b:b + 1], deltas.get(name), width) if decoder_prompt else mixed[b:b + 1],
                   inputs, b)
        floor = (_own(own_outputs(whole, deltas.get(name), whole.shape[1] - inputs["input_ids"].shape[1])
                      if decoder_prompt else whole, inputs, b) - one).abs().max().item()
        torch.testing.assert_close(got, one, rtol=0, atol=max(TOLERANCE * max(1.0, one.abs().max().item()), 2 * floor))


@pytest.mark.parametrize("delta_type", TYPES)
def test_minilm_rows_equal_each_row_alone(minilm_classifier, delta_type):
    model, tokenizer = minilm_classifier
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    _check(model, two_deltas(model, delta_type, ["attention.self", "intermediate"]), inputs, decoder_prompt=False)


def test_the_paired_parallel_adapter_has_no_row_form(minilm_classifier):
    model, _ = minilm_classifier  # BERT's default parallel adapter is the pair form: read at one module, added at another
    deltas = {"paired": AutoDeltaModel.from_config({"delta_type": "parallel_adapter"}, model, attach=False,
                                                   name="paired")}
    with pytest.raises(TypeError, match="without a row form: KeepInput, PairedAdapterLayer"):
        DeltaBank(model, deltas)


@pytest.mark.parametrize("delta_type", TYPES)
def test_smollm2_rows_equal_each_row_alone(smollm2, delta_type):
    model, tokenizer = smollm2
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() numbers them
    _check(model, two_deltas(model, delta_type, ["self_attn", "mlp"]), inputs, decoder_prompt=delta_type == "soft_prompt")
