"""Merging where a delta is not alone: a merge either gives exactly what the unmerged deltas compute, or is refused
before anything changes (composition on one module, kept copies undone out of order, tied weights)."""

import itertools

import pytest
import torch

from deltatune import BitFitModel, IA3Model, LoraModel

from conftest import first_output, tiny_batch, tiny_model


def _perturbed(*deltas):
    torch.manual_seed(0)
    with torch.no_grad():
        for delta in deltas:
            for parameter in delta.delta_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return deltas


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}


@pytest.mark.parametrize("first,second", [
    (lambda m: IA3Model(m, ["k_proj"]), lambda m: LoraModel(m, ["k_proj"])),
    (lambda m: LoraModel(m, ["k_proj"], use_dora=True), lambda m: LoraModel(m, ["k_proj"], name="plain")),
    (lambda m: IA3Model(m, ["k_proj"]), lambda m: BitFitModel(m, ["k_proj"])),
], ids=["ia3+lora", "dora+lora", "ia3+bitfit"])
def test_a_merge_that_would_change_a_composition_is_refused_and_changes_nothing(first, second):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    a, b = _perturbed(first(model), second(model))
    before, weights = first_output(model, batch), _weights(model)
    with pytest.raises(RuntimeError, match=rf"cannot merge {a.name!r} while \w+ {b.name!r} also acts on "
                                           r"model\.layers\.0\.self_attn\.k_proj"):
        a.merge()
    assert not a.merged and a.attached
    assert all(torch.equal(weights[k], v) for k, v in _weights(model).items())
    assert torch.equal(first_output(model, batch), before)


def test_additive_deltas_merge_beside_others_in_any_order_and_unmerge_back():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    deltas = _perturbed(LoraModel(model, ["q_proj"]), LoraModel(model, ["q_proj"], name="second"),
                        BitFitModel(model, ["q_proj"]), IA3Model(model, ["k_proj"]))
    tuned, weights = first_output(model, batch), _weights(model)
    for order in itertools.permutations(deltas[:3]):
        for delta in order:
            delta.merge()
            torch.testing.assert_close(first_output(model, batch), tuned, atol=1e-5, rtol=1e-4)
        for delta in order:  # first merged, first unmerged: out of stack order
            delta.unmerge()
            torch.testing.assert_close(first_output(model, batch), tuned, atol=1e-5, rtol=1e-4)
        for key, value in _weights(model).items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_a_kept_copy_is_never_restored_over_another_merge():
    model = tiny_model("llama")
    exact, plain = _perturbed(LoraModel(model, ["q_proj"]), LoraModel(model, ["q_proj"], name="plain"))
    exact.merge(exact=True)
    with pytest.raises(RuntimeError, match="one unmerge would restore weights from before the other's merge"):
        plain.merge()
    exact.unmerge()
    plain.merge()
    with pytest.raises(RuntimeError, match="one unmerge would restore weights from before the other's merge"):
        exact.merge(exact=True)


def test_a_merge_into_tied_weights_is_refused():
    model, batch = tiny_model("gpt2"), tiny_batch("gpt2")
    (lora,) = _perturbed(LoraModel(model, ["wte"]))
    tuned = first_output(model, batch)
    with pytest.raises(RuntimeError, match=r"cannot merge 'lora': transformer\.wte\.weight is tied to "
                                           r"\['lm_head\.weight'\]"):
        lora.merge()
    assert torch.equal(first_output(model, batch), tuned) and not lora.merged


def test_a_merge_into_a_parametrized_weight_is_refused():
    from collections import OrderedDict

    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)  # weight_norm computes `fc.weight` at each access: an update added to it would be lost
    model = nn.Sequential(OrderedDict(fc=weight_norm(nn.Linear(8, 8)), out=nn.Linear(8, 2))).eval()
    x = torch.randn(3, 8)
    (lora,) = _perturbed(LoraModel(model, ["fc"], lora_r=2, pseudo_input=x))
    tuned = model(x)
    with pytest.raises(RuntimeError, match=r"cannot merge 'lora': fc\.weight is parametrized"):
        lora.merge()
    assert torch.equal(model(x), tuned) and not lora.merged
