"""Gradient checkpointing (transformers' ``gradient_checkpointing_enable``): deltas get the gradients they get
without it; a prefix, whose keys and values travel in the KV cache that checkpointed layers drop, is refused."""

import pytest
import torch

from deltatune import PrefixModel, compat

from conftest import FAMILIES, tiny_batch, tiny_model
from methods.test_families import build

pytestmark = pytest.mark.compat  # how checkpointed layers treat their arguments is transformers' internals


def _checkpointing(model, enable: bool) -> None:
    """transformers' own switch: ``activation_checkpointing_*`` where it exists (the older name is deprecated)."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{name}_checkpointing_{'enable' if enable else 'disable'}")()


def _gradients(family: str, method: str, checkpointing: bool) -> list[torch.Tensor]:
    model = tiny_model(family)
    delta = build(method, family, model)
    torch.manual_seed(1)
    for parameter in delta.delta_parameters():  # away from the identity, so every tensor has a gradient
        parameter.data.normal_(0, 0.1)
    delta.freeze_module(exclude=["deltas"])
    if checkpointing:
        _checkpointing(model, True)
    model.train()
    assert bool(compat.checkpointing_layer(model)) == checkpointing  # else the comparison would be of equals
    torch.manual_seed(2)  # the same dropout masks in both runs
    model(**tiny_batch(family)).loss.backward()
    return [p.grad for p in delta.delta_parameters()]


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "bart", "llama"])
@pytest.mark.parametrize("method", ["lora", "adapter", "soft_prompt", "ia3"])
def test_deltas_get_the_same_gradients_with_checkpointing(family, method):
    plain, checkpointed = _gradients(family, method, False), _gradients(family, method, True)
    assert all(g is not None and g.abs().sum() > 0 for g in checkpointed)
    for without, with_ in zip(plain, checkpointed):
        torch.testing.assert_close(with_, without, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_a_prefix_is_refused_under_checkpointing_and_trains_without_it(family):
    model = tiny_model(family)
    delta = PrefixModel(model, prefix_token_num=3, embed_dim=16, mid_dim=16)
    delta.freeze_module(exclude=["deltas"])
    _checkpointing(model, True)
    model.train()
    batch = tiny_batch(family)
    # Before, the layers ran without the prefix: BERT's prefix silently got no gradient, LLaMA failed on a mask.
    with pytest.raises(RuntimeError, match=r"drops the cache in layers that checkpoint gradients \(here \w+\): "
                                           r"turn gradient checkpointing off"):
        model(**batch)
    model.eval()
    with torch.no_grad():
        model(**batch)  # not training: nothing is checkpointed, the prefix works
    model.train()
    _checkpointing(model, False)
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.trainable_parameters())


def test_prefix_rows_get_the_same_gradients_with_checkpointing():
    """Attention without a cache (DistilBERT) takes its prefix as rows of k and v, which checkpointing keeps."""
    import transformers

    config = transformers.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.DistilBertForSequenceClassification(config)
        delta = PrefixModel(model, prefix_token_num=3, embed_dim=16, mid_dim=16, allow_larger_than_backbone=True)
        delta.freeze_module(exclude=["deltas"])
        if checkpointing:
            _checkpointing(model, True)
        model.train()
        assert bool(compat.checkpointing_layer(model)) == checkpointing
        torch.manual_seed(2)
        model(input_ids=torch.randint(1, 100, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
        gradients.append([p.grad for p in delta.trainable_parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in gradients[1])
    for without, with_ in zip(*gradients):
        torch.testing.assert_close(with_, without, rtol=1e-5, atol=1e-7)
