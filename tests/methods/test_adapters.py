"""The adapter family: closed-form parameter counts, identity at init, low-rank factors of any rank."""

import pytest
import torch

from deltatune import AdapterModel, LowRankAdapterModel, ParallelAdapterModel

from conftest import first_output, tiny_batch, tiny_model

D, FFN, LAYERS = 32, 64, 2  # the tiny BERT


def test_adapter_parameter_count():
    delta = AdapterModel(tiny_model("bert"), ["attention.output"], bottleneck_dim=8)
    assert delta.num_delta_parameters() == LAYERS * (2 * D * 8 + 8 + D)


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_adapter_parameter_count_and_rank(rank):
    delta = LowRankAdapterModel(tiny_model("bert"), ["attention.output"], reduction_factor=4, low_rank_rank=rank)
    m = D // 4
    assert delta.num_delta_parameters() == LAYERS * (rank * (D + m) + m + rank * (m + D) + D)
    layer = next(iter(delta.deltas.values()))
    with torch.no_grad():
        layer.up.left.normal_()
    weight = layer.up.left @ layer.up.right
    assert torch.linalg.matrix_rank(weight) == rank, "a real matrix product of rank k, not an elementwise one"


def test_parallel_adapter_reads_the_input_and_writes_the_output():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    reference = first_output(model, batch)
    delta = ParallelAdapterModel(model, ["intermediate"], bottleneck_dim=4, scaled=0.5)
    assert delta.num_delta_parameters() == LAYERS * (D * 4 + 4 + 4 * FFN + FFN)
    assert torch.equal(first_output(model, batch), reference)
    layer = next(iter(delta.deltas.values()))
    assert (layer.down.in_features, layer.up.out_features) == (D, FFN)
    with torch.no_grad():
        layer.up.weight.normal_()
    x = torch.randn(1, 3, D)
    host = model.bert.encoder.layer[0].intermediate
    expected = host.intermediate_act_fn(host.dense(x)) + 0.5 * layer.up(layer.act(layer.down(x)))
    torch.testing.assert_close(host(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shared", [True, False])
def test_compacter_parameter_count_follows_the_formula(shared):
    from deltatune import CompacterModel

    n, r, m = 4, 2, 8
    delta = CompacterModel(tiny_model("bert"), ["attention.output"], reduction_factor=4, hypercomplex_division=n,
                           phm_rank=r, shared_phm_rule=shared)
    per_module = r * (D + m) + m + r * (m + D) + D
    rules = 2 * n**3 * (1 if shared else LAYERS)
    assert delta.num_delta_parameters() == LAYERS * per_module + rules


def test_phm_weight_is_a_sum_of_kronecker_products():
    from deltatune import CompacterModel

    delta = CompacterModel(tiny_model("bert"), ["attention.output"], reduction_factor=4, phm_rank=2)
    down = next(iter(delta.deltas.values())).down
    blocks = down.left @ down.right
    expected = sum(torch.kron(down.rule[i], blocks[i]) for i in range(4))
    torch.testing.assert_close(down.weight(), expected, rtol=0, atol=1e-7)
    assert down.weight().shape == (8, D)


def test_compacter_division_must_divide_the_sizes():
    from deltatune import CompacterModel

    with pytest.raises(ValueError, match="hypercomplex_division=5 must divide"):
        CompacterModel(tiny_model("bert"), ["attention.output"], hypercomplex_division=5)


def test_parallel_adapter_pair_form_spans_the_feed_forward_block(tmp_path):
    from deltatune import DeltaBase

    model = tiny_model("bert")
    batch = tiny_batch("bert")
    reference = first_output(model, batch)
    ffn_out = r"[r]layer\.\d+\.output\.dense"
    delta = ParallelAdapterModel(model, ["intermediate"], output_modules=[ffn_out], bottleneck_dim=4, scaled=2.0)
    assert delta.num_delta_parameters() == LAYERS * (D * 4 + 4 + 4 * D + D)
    assert torch.equal(first_output(model, batch), reference)
    layer = delta.deltas["bert.encoder.layer.0.output.dense"]
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(std=0.1)
    x = torch.randn(1, 3, D)
    block = model.bert.encoder.layer[0]
    hidden = block.intermediate(x)  # keeps x for the adapter
    expected = torch.nn.functional.linear(hidden, block.output.dense.weight, block.output.dense.bias)
    expected = expected + 2.0 * layer.up(layer.act(layer.down(x)))
    torch.testing.assert_close(block.output.dense(hidden), expected, rtol=0, atol=1e-6)

    tuned = first_output(model, batch)
    delta.save_finetuned(tmp_path / "pair")
    fresh = tiny_model("bert")
    DeltaBase.from_finetuned(tmp_path / "pair", fresh)
    assert torch.equal(first_output(fresh, batch), tuned)
    delta.detach()
    assert torch.equal(first_output(model, batch), reference)


def test_parallel_adapter_pairs_must_line_up():
    with pytest.raises(ValueError, match="as many modules as modified_modules"):
        ParallelAdapterModel(tiny_model("bert"), ["intermediate"], output_modules=["dense"])
