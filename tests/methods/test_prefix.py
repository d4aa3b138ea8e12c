"""Prefix tuning: parameter count, generation with a KV cache, padding in encoders, folding, errors."""

import pytest
import torch

from deltatune import DeltaBase, PrefixModel

from conftest import first_output, tiny_batch, tiny_model

SMALL = {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16}


def test_parameter_count_follows_the_formula():
    model = tiny_model("llama")  # 2 layers, 2 KV heads (GQA) of size 8
    width = 2 * 2 * 2 * 8
    assert PrefixModel(model, **SMALL).num_delta_parameters() == 3 * 16 + 16 * 16 + 16 + 16 * width + width
    assert PrefixModel(model, **SMALL, reparameterize=False).num_delta_parameters() == 3 * width


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_generation_with_a_cache_equals_without_and_survives_fold_and_reload(family, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(1)}  # left-padded
    delta = PrefixModel(model, **SMALL)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(**inputs, **options)
    assert torch.equal(cached, model.generate(**inputs, **options, use_cache=False))
    # The ground truth: one forward pass over the whole generated sequence picks the same tokens.
    with torch.no_grad():
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 6, dtype=torch.long)], dim=1)
        logits = model(input_ids=cached, attention_mask=mask).logits
    assert torch.equal(logits[:, -7:-1].argmax(-1), cached[:, -6:])

    outputs = first_output(model, batch)
    delta.fold()
    assert not delta.config.reparameterize and delta.num_delta_parameters() == 3 * sum(
        t.shape[-1] for t in delta.delta_parameters())
    torch.testing.assert_close(first_output(model, batch), outputs, rtol=0, atol=1e-6)  # the MLP ran once, same math
    delta.save_finetuned(tmp_path / "prefix")
    fresh = tiny_model(family)
    DeltaBase.from_finetuned(tmp_path / "prefix", fresh)
    assert torch.equal(fresh.generate(**inputs, **options), model.generate(**inputs, **options))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoders_hook_the_bare_model_and_respect_padding(family):
    model = tiny_model(family)
    batch = tiny_batch(family)
    delta = PrefixModel(model, **SMALL)
    assert delta.positions == [family]  # BertForSequenceClassification.forward takes no cache; BertModel does
    tuned = first_output(model, batch)
    assert not torch.allclose(tuned, first_output(tiny_model(family), batch))
    padded_row_changed = dict(batch, input_ids=batch["input_ids"].clone())
    padded_row_changed["input_ids"][0, -2:] = 7  # row 0's last two tokens are masked out
    torch.testing.assert_close(first_output(model, padded_row_changed)[0], tuned[0], rtol=0, atol=1e-6)


def test_unsupported_models_and_arguments():
    import transformers as tf

    distilbert = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64))
    with pytest.raises(TypeError, match="whose forward takes past_key_values, not DistilBertModel"):
        PrefixModel(distilbert)
    with pytest.raises(TypeError, match="not T5ForConditionalGeneration"):
        PrefixModel(tiny_model("t5"))
    with pytest.raises(ValueError, match="takes no modified_modules"):
        PrefixModel(tiny_model("llama"), ["q_proj"])
