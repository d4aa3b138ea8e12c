"""Every method on a tiny random model of every family: attach, train a step, save/load, detach bit-exactly."""

import pytest
import torch

from deltatune import (AdapterModel, BitFitModel, CompacterModel, DeltaBase, IA3Model, LoraModel, LowRankAdapterModel,
                       ParallelAdapterModel, PrefixModel, SoftPromptModel)

from conftest import FAMILIES, first_output, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # run at both ends of the supported transformers range

METHODS = {"lora": LoraModel, "adapter": AdapterModel, "bitfit": BitFitModel, "ia3": IA3Model,
           "low_rank_adapter": LowRankAdapterModel, "compacter": CompacterModel,
           "soft_prompt": SoftPromptModel, "prefix": PrefixModel, "parallel_adapter": ParallelAdapterModel}


def build(method: str, family: str, model):
    spec = FAMILIES[family].positions[method]
    return METHODS[method](model, **(spec if isinstance(spec, dict) else {"modified_modules": spec}))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_attach_train_save_load_detach(family, method, tmp_path):
    if method not in FAMILIES[family].positions:
        pytest.skip(f"{method} does not support {family} yet")
    model = tiny_model(family)
    batch = tiny_batch(family)
    reference = first_output(model, batch)
    backbone_before = {k: v.clone() for k, v in model.state_dict().items()}

    delta = build(method, family, model)
    delta.freeze_module(exclude=["deltas"])
    initial = first_output(model, batch)
    if method not in ("soft_prompt", "prefix"):  # the others are the identity at init (LoRA B=0, adapter up=0, Δb=0, l=1)
        assert torch.equal(initial, reference)

    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[1] != losses[0]
    assert all(p.abs().sum() > 0 for p in delta.delta_parameters()), "every delta tensor received an update"
    tuned = first_output(model, batch)
    assert tuned.shape == initial.shape and not torch.equal(tuned, initial), "training changed the outputs"

    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    assert torch.equal(first_output(model, batch), reference), "detach restores the exact computation"
    assert not any("deltas" in k for k in model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(backbone_before[k], v) for k, v in model.state_dict().items())

    fresh = tiny_model(family)
    loaded = DeltaBase.from_finetuned(tmp_path / "delta", fresh)
    assert type(loaded) is METHODS[method] and loaded.positions == delta.positions
    assert torch.equal(first_output(fresh, batch), tuned)
