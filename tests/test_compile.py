"""torch.compile: a compiled model follows attach, detach, merge and unmerge instead of replaying a stale graph."""

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
