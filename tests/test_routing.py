"""Composition of several deltas on the same modules, and the routes themselves."""

import pytest
import torch
from torch import nn

from deltatune import AdapterModel, LoraModel
from deltatune.routing import Route, attach, detach

from conftest import first_output, tiny_batch, tiny_model

POSITIONS = ["query", "value"]


def _randomize(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(std=0.1)


@pytest.fixture()
def batch():
    return tiny_batch("bert")


def _single(kind, batch):
    """Output of the model with only one delta, built with the same seed as in the composition."""
    model = tiny_model("bert")
    torch.manual_seed(5 if kind == "lora" else 6)
    delta = (LoraModel if kind == "lora" else AdapterModel)(model, POSITIONS)
    _randomize(delta)
    return first_output(model, batch)


@pytest.mark.parametrize("first_off", ["lora", "adapter"])
@pytest.mark.parametrize("build_order", [("lora", "adapter"), ("adapter", "lora")])
def test_two_deltas_on_the_same_modules_detach_in_any_order(first_off, build_order, batch):
    model = tiny_model("bert")
    reference = first_output(model, batch)
    deltas = {}
    for kind in build_order:
        torch.manual_seed(5 if kind == "lora" else 6)
        deltas[kind] = (LoraModel if kind == "lora" else AdapterModel)(model, POSITIONS)
        _randomize(deltas[kind])
    both = first_output(model, batch)
    second_off = "adapter" if first_off == "lora" else "lora"

    deltas[first_off].detach()
    assert torch.equal(first_output(model, batch), _single(second_off, batch))
    deltas[first_off].attach()
    assert torch.equal(first_output(model, batch), both), "re-attaching restores the composition exactly"
    deltas[first_off].detach()
    deltas[second_off].detach()
    assert torch.equal(first_output(model, batch), reference)


def test_one_hook_per_module_whatever_the_number_of_deltas(batch):
    model = tiny_model("bert")
    LoraModel(model, POSITIONS)
    LoraModel(model, POSITIONS)
    AdapterModel(model, POSITIONS)
    query = model.bert.encoder.layer[0].attention.self.query
    assert len(query._forward_hooks) == 1 and len(query._forward_pre_hooks) == 0
    assert list(query.deltas.keys()) == ["lora", "lora_1", "adapter"]


def test_routes_on_a_module_called_with_keyword_input():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    class Caller(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Scale()

        def forward(self, x):
            return self.inner(x=x)

    class Shift(nn.Module):
        def forward(self, x):
            return x + 1

    class AddInput(nn.Module):
        def forward(self, x, h):
            return h + x

    model, x = Caller(), torch.ones(3)
    attach(model.inner, "shift", Shift(), Route.INPUT_INPUT, 0)
    assert torch.equal(model(x), torch.full((3,), 4.0))  # (1 + 1) * 2
    attach(model.inner, "parallel", AddInput(), Route.INPUT_OUTPUT, 1)
    assert torch.equal(model(x), torch.full((3,), 6.0))  # 4 + the rewritten input 2
    attach(model.inner, "out", Shift(), Route.OUTPUT_OUTPUT, 2)
    assert torch.equal(model(x), torch.full((3,), 7.0))
    for name in ("shift", "parallel", "out"):
        detach(model.inner, name)
    assert torch.equal(model(x), torch.full((3,), 2.0))
    assert not model.inner._forward_hooks and not model.inner._forward_pre_hooks and not model.inner._modules


def test_tuple_outputs_keep_their_other_elements(batch):
    model = tiny_model("gpt2")
    model.set_attn_implementation("eager")  # the only implementation that returns attention weights
    AdapterModel(model, ["attn"])  # GPT2Attention returns (hidden, attention weights)
    out = model(input_ids=batch["input_ids"], output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape[-1] == batch["input_ids"].shape[1]


def test_a_slot_name_collision_is_an_error():
    model = tiny_model("bert")
    LoraModel(model, POSITIONS, name="task")
    with pytest.raises(ValueError, match="already attached"):
        AdapterModel(model, POSITIONS, name="task")


def test_reserved_delta_names_are_refused():
    with pytest.raises(ValueError, match="cannot name a delta"):
        LoraModel(tiny_model("bert"), POSITIONS, name="keys")


def test_deepcopy_of_a_modified_backbone_routes_through_its_own_copies(batch):
    import copy

    model = tiny_model("bert")
    delta = LoraModel(model, POSITIONS)
    _randomize(delta)
    tuned = first_output(model, batch)
    clone = copy.deepcopy(model)
    delta.detach()
    assert torch.equal(first_output(clone, batch), tuned), "the copy keeps its delta when the original detaches"
    with torch.no_grad():
        for slot in (m for n, m in clone.named_modules() if n.endswith(".deltas")):
            slot.lora.lora_B.zero_()
    assert torch.equal(first_output(clone, batch), first_output(model, batch))


def test_a_model_output_keeps_its_other_fields(batch):
    model = tiny_model("bert")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        bare = model.bert(**inputs)
    delta = AdapterModel(model, ["bert"])  # BertModel returns a ModelOutput: last_hidden_state, pooler_output
    _randomize(delta)
    with torch.no_grad():
        out = model.bert(**inputs)
    assert not torch.equal(out.last_hidden_state, bare.last_hidden_state)
    assert torch.equal(out.pooler_output, bare.pooler_output), "only the first field is re-routed"


def test_a_sequential_host_still_runs_its_own_children():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    model = nn.Sequential(mlp)
    x = torch.randn(2, 4)
    reference = model(x)
    delta = AdapterModel(model, ["0"], pseudo_input=x, bottleneck_dim=2)  # the host is itself a Sequential
    assert list(mlp._modules)[-1] == "deltas", "the slot is the host's last child, which Sequential calls too"
    assert torch.equal(model(x), reference)
    with torch.no_grad():
        delta.deltas["0"].up.weight.normal_()
    assert not torch.equal(model(x), reference)
    delta.detach()
    assert torch.equal(model(x), reference)
