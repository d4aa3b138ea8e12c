"""A delta saved with a backbone in one floating-point precision loads onto the same backbone in another: its
tensors take the backbone's dtype, and the backbone check knows it for the same backbone."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from deltatune import DeltaBase, LoraModel, from_peft
from deltatune.checkpoint import WEIGHTS_FILE

from conftest import tiny_model

POSITIONS = ["q_proj", "v_proj"]


def _params_only(model, dtype):
    """As ``from_pretrained(dtype=...)`` loads a model: parameters cast, rotary buffers kept in float32."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _saved(tmp_path, model):
    delta = LoraModel(model, POSITIONS)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(std=0.1)
    delta.save_finetuned(tmp_path / "delta")
    return tmp_path / "delta", load_file(tmp_path / "delta" / WEIGHTS_FILE)


def _load_quietly(folder, model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "other structure" nor "other weights"
        return DeltaBase.from_finetuned(folder, model)


@pytest.mark.parametrize("save,load", [
    ("float32", "bfloat16"), ("bfloat16", "float32"), ("bfloat16 params", "float32"), ("float32", "float16 params"),
    ("float32", "float64"),
])
def test_a_delta_loads_onto_the_same_backbone_in_another_precision(tmp_path, save, load):
    def backbone(spec):
        dtype, _, scope = spec.partition(" ")
        model = tiny_model("llama")
        dtype = getattr(torch, dtype)
        return _params_only(model, dtype) if scope else model.to(dtype)

    assert any(b.dtype == torch.float32 for b in _params_only(tiny_model("llama"), torch.bfloat16).buffers())
    folder, tensors = _saved(tmp_path, backbone(save))
    model = backbone(load)
    delta = _load_quietly(folder, model)
    dtype = next(model.parameters()).dtype
    for key, value in delta.delta_state_dict().items():
        assert value.dtype == dtype
        assert torch.equal(value, tensors[key].to(dtype)), key
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert model(ids).logits.dtype == dtype


def test_other_weights_are_still_told_apart_in_a_finer_precision(tmp_path):
    folder, _ = _saved(tmp_path, tiny_model("llama"))
    other = tiny_model("llama").double()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.warns(UserWarning, match="same architecture but other weights"):
        DeltaBase.from_finetuned(folder, other)


def test_another_structure_in_another_precision_is_still_warned(tmp_path):
    folder, _ = _saved(tmp_path, tiny_model("llama"))
    other = tiny_model("llama").to(torch.bfloat16)
    other.register_buffer("extra", torch.zeros(3))
    with pytest.warns(UserWarning, match="names/shapes/dtypes differ"):
        DeltaBase.from_finetuned(folder, other)


def test_values_that_overflow_the_backbones_precision_are_refused(tmp_path):
    model = tiny_model("llama")
    delta = LoraModel(model, POSITIONS)
    with torch.no_grad():
        delta.delta_parameters()[0][0, 0] = 1e6  # beyond float16's 65,504
    delta.save_finetuned(tmp_path / "delta")
    half = tiny_model("llama").half()
    with pytest.raises(ValueError, match=r"lora_A: its torch.float32 values overflow torch.float16"):
        DeltaBase.from_finetuned(tmp_path / "delta", half)
    assert not any(m._forward_hooks for m in half.modules()), "nothing attached after a failed load"


def test_a_peft_export_in_half_precision_imports_onto_a_float32_backbone(tmp_path):
    model = tiny_model("llama").half()
    delta = LoraModel(model, POSITIONS)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(std=0.1)
    delta.export_peft(tmp_path / "adapter")
    imported = from_peft(tmp_path / "adapter", tiny_model("llama"))
    for (key, ours), theirs in zip(delta.delta_state_dict().items(), imported.delta_state_dict().values()):
        assert theirs.dtype == torch.float32 and torch.equal(theirs, ours.float()), key


def test_a_head_kept_apart_loads_onto_the_backbone_in_another_precision(tmp_path):
    model = tiny_model("bert")
    delta = LoraModel(model, ["query", "value"]).freeze_module(exclude=["deltas", "classifier"])
    delta.save_finetuned(tmp_path / "delta")
    served = tiny_model("bert").to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DeltaBase.from_finetuned(tmp_path / "delta", served, attach=False, keep_backbone_apart=True)
    assert torch.equal(loaded.backbone_apart["classifier.weight"], model.classifier.weight.detach())
