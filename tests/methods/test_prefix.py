"""Prefix tuning on decoder-only models: parameter count, generation with a KV cache, folding, errors."""

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


def test_unsupported_models_and_arguments():
    with pytest.raises(TypeError, match="decoder-only transformers models, not BertForSequenceClassification"):
        PrefixModel(tiny_model("bert"))
    with pytest.raises(TypeError, match="not T5ForConditionalGeneration"):
        PrefixModel(tiny_model("t5"))
    with pytest.raises(ValueError, match="takes no modified_modules"):
        PrefixModel(tiny_model("llama"), ["q_proj"])
