"""torch.compile: a compiled model follows attach, detach, merge and unmerge instead of replaying a stale graph,
and never runs a graph traced on another model with other deltas."""

import pytest
import torch

from deltatune import BitFitModel, LoraModel

from conftest import first_output, tiny_batch, tiny_model


def test_a_compiled_model_follows_every_lifecycle_change():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    bare = first_output(model, batch)
    lora = LoraModel(model, ["query", "value"])
    bitfit = BitFitModel(model, ["dense"])
    with torch.no_grad():
        for parameter in [*lora.delta_parameters(), *bitfit.delta_parameters()]:
            parameter.normal_()
    both = first_output(model, batch)
    bitfit.detach()
    lora_only = first_output(model, batch)
    bitfit.attach()
    # Dynamo's own caching decides staleness, whatever the backend: "eager" keeps the test fast on a CPU.
    compiled = torch.compile(model, backend="eager")

    def check(expected):
        torch.testing.assert_close(first_output(compiled, batch), expected, rtol=0, atol=1e-5)

    check(both)
    lora.detach()
    bitfit.detach()
    check(bare)
    lora.attach()
    check(lora_only)
    bitfit.attach()
    check(both)
    lora.merge()
    check(both)  # merged: same function, now in the weights (round-off only)
    lora.unmerge()
    bitfit.detach()
    check(lora_only)


@pytest.mark.parametrize("first", ["bare", "tuned"])
def test_a_bare_model_and_a_tuned_copy_compiled_side_by_side_keep_their_own_outputs(first):
    # torch's default: no guards on module hooks, so one architecture's graph served every model of it.
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        torch.compiler.reset()
        _check_side_by_side(first)


def _check_side_by_side(first):
    batch = tiny_batch("llama")
    bare, tuned = tiny_model("llama"), tiny_model("llama")
    lora = LoraModel(tuned, ["q_proj", "v_proj", "gate_proj", "down_proj"])
    with torch.no_grad():
        for parameter in lora.delta_parameters():
            parameter.normal_()
    expected = {"bare": first_output(bare, batch), "tuned": first_output(tuned, batch)}
    assert (expected["tuned"] - expected["bare"]).abs().max() > 0.1
    models = {"bare": bare, "tuned": tuned}
    # Whole models, then only the feed-forward blocks (one code object shared by every layer of both models).
    for compile_ in (lambda m: torch.compile(m, backend="eager"), _compile_mlps):
        compiled = {name: compile_(model) for name, model in models.items()}
        for name in sorted(models, key=lambda n: n != first):  # `first` runs first
            torch.testing.assert_close(first_output(compiled[name], batch), expected[name], rtol=0, atol=1e-5)
        for model in models.values():
            _uncompile_mlps(model)


def _compile_mlps(model):
    for layer in model.model.layers:
        layer.mlp.compile(backend="eager")
    return model


def _uncompile_mlps(model):
    for layer in model.model.layers:
        layer.mlp._compiled_call_impl = None
