"""(IA)³: parameter count, merge equivalence and exact unmerge, feed-forward positions."""

import pytest
import torch

from deltatune import IA3Model, Route

from conftest import first_output, tiny_batch, tiny_model

LLAMA = {"modified_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


def test_parameter_count_and_routes():
    delta = IA3Model(tiny_model("llama"), **LLAMA)
    # 2 layers × (k: 16 + v: 16 outputs, since 2 KV heads × 8; down_proj input: 64)
    assert delta.num_delta_parameters() == 2 * (16 + 16 + 64)
    assert delta.route_at("model.layers.0.mlp.down_proj") is Route.INPUT_INPUT
    assert delta.route_at("model.layers.0.self_attn.k_proj") is Route.OUTPUT_OUTPUT


@pytest.mark.parametrize("family,kwargs", [
    ("llama", LLAMA),
    ("gpt2", {"modified_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
    ("bert", {"modified_modules": ["key", "value", r"[r]layer\.\d+\.output\.dense"],
              "feedforward_modules": [r"[r]layer\.\d+\.output\.dense"]}),
])
def test_merge_matches_unmerged_and_unmerge_restores_exactly(family, kwargs):
    model = tiny_model(family)
    batch = tiny_batch(family)
    delta = IA3Model(model, **kwargs)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.uniform_(0.5, 1.5)
    unmerged = first_output(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta.merge()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(first_output(model, batch), unmerged, rtol=0, atol=1e-5)  # float32 round-off
    delta.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first_output(model, batch), unmerged)


def test_feedforward_modules_must_be_modified():
    with pytest.raises(ValueError, match="must be among the modified modules"):
        IA3Model(tiny_model("llama"), ["k_proj"], feedforward_modules=["down_proj"])
