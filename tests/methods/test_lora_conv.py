"""LoRA on convolutions: the update is conv(conv(x, A), B) with the host's geometry, merges as one convolution
weight, crosses to and from PEFT, and is refused where it would not be one convolution of the host's form."""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from deltatune import DeltaBank, LoraModel, from_peft

CONVOLUTIONS = [  # (host, input): strides, padding, dilation and a kernel that is not square
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 11)),
    (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=2, dilation=2, bias=False), torch.randn(2, 3, 9, 10)),
    (nn.Conv2d(3, 5, 3, padding="same"), torch.randn(2, 3, 8, 7)),
    (nn.Conv3d(2, 4, 2, stride=2), torch.randn(1, 2, 4, 6, 6)),
]


def _net(conv: nn.Module) -> nn.Module:
    """A network around a copy of ``conv`` (the cases are shared), with the same weights each time."""
    conv = copy.deepcopy(conv)
    torch.manual_seed(0)
    conv.reset_parameters()
    return nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU())).eval()


def _perturbed(delta: LoraModel) -> LoraModel:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return delta


@pytest.mark.parametrize("host, x", CONVOLUTIONS, ids=["conv1d", "conv2d-dilated", "conv2d-same", "conv3d"])
def test_the_update_is_a_convolution_of_the_hosts_form_and_merges(host, x, tmp_path):
    model = _net(host)
    host = model.conv
    bare = model(x)
    delta = _perturbed(LoraModel(model, ["conv"], lora_r=2, lora_alpha=6, pseudo_input=x,
                                 allow_larger_than_backbone=True))
    layer = delta.deltas["conv"]
    assert layer.lora_A.shape == (2, host.in_channels, *host.kernel_size)  # PEFT's shapes
    assert layer.lora_B.shape == (host.out_channels, 2, *(1,) * len(host.kernel_size))
    geometry = {"stride": host.stride, "padding": host.padding, "dilation": host.dilation}
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(host.kernel_size)]
    update = conv(conv(x, layer.lora_A, **geometry), layer.lora_B)
    tuned = model(x)
    torch.testing.assert_close(tuned, torch.relu(conv(x, host.weight, host.bias, **geometry) + 3 * update))
    delta.merge(exact=True)  # one convolution with W + ΔW, ΔW = (α/r) B A per kernel offset
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=1e-5)
    delta.unmerge()
    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    assert torch.equal(model(x), bare)
    fresh = _net(host)
    LoraModel.from_finetuned(tmp_path / "delta", fresh, pseudo_input=x, allow_larger_than_backbone=True)
    assert torch.equal(fresh(x), tuned)


def test_convolutions_lora_cannot_adapt_are_refused_with_the_reason():
    x = torch.randn(1, 4, 8, 8)
    cases = [
        (nn.Conv2d(4, 4, 3, groups=2), {}, r"conv \(Conv2d\): it is grouped \(groups=2\)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), {}, "it pads by 'reflect'"),
        (nn.Conv2d(4, 4, 3), {"use_dora": True}, r"it supports nn\.Linear and transformers Conv1D when use_dora"),
        (nn.ConvTranspose2d(4, 4, 3), {}, r"it supports nn\.Linear, transformers Conv1D, nn\.Embedding and "
                                          r"nn\.Conv1d/2d/3d"),
    ]
    for host, options, message in cases:
        with pytest.raises(TypeError, match=message):
            LoraModel(_net(host), ["conv"], pseudo_input=x, allow_larger_than_backbone=True, **options)


def _vit():
    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=32, patch_size=8)
    return tf.ViTForImageClassification(config).eval()


IMAGES = torch.randn(2, 3, 32, 32)


def test_a_patch_embedding_lora_crosses_to_and_from_peft(tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["projection", "classifier"]  # the patch embedding is a Conv2d
    model = _vit()
    delta = _perturbed(LoraModel(model, targets, lora_r=4))
    ours = model(pixel_values=IMAGES).logits
    delta.export_peft(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_vit(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(pixel_values=IMAGES).logits, ours, rtol=0, atol=1e-5)

    peft_model = peft.get_peft_model(_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    expected = peft_model(pixel_values=IMAGES).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    model = _vit()
    from_peft(tmp_path / "theirs", model)
    torch.testing.assert_close(model(pixel_values=IMAGES).logits, expected, rtol=0, atol=1e-5)


def test_a_dilated_convolution_does_not_cross_to_peft_which_leaves_the_dilation_out(tmp_path):
    host, x = CONVOLUTIONS[1]
    delta = LoraModel(_net(host), ["conv"], pseudo_input=x, allow_larger_than_backbone=True)
    with pytest.raises(ValueError, match=r"\['conv'\] are dilated convolutions, on which PEFT's LoRA leaves out"):
        delta.export_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    peft = pytest.importorskip("peft")  # nor from PEFT: its adapter saves, though PEFT cannot run it there
    peft.get_peft_model(_net(host), peft.LoraConfig(r=2, target_modules=["conv"])).save_pretrained(tmp_path / "theirs")
    model = _net(host)
    model.dummy_inputs = {"input": x}  # what the probe runs (from_peft takes no pseudo_input)
    with pytest.raises(ValueError, match=r"\['conv'\] are dilated convolutions"):
        from_peft(tmp_path / "theirs", model)
    assert not hasattr(model.conv, "deltas")


def test_a_bank_refuses_a_convolution_lora_which_has_no_row_form():
    model = _vit()
    bank = DeltaBank(model)
    with pytest.raises(TypeError, match="has modules without a row form: LoraConvLayer"):
        bank.add(LoraModel(model, ["projection"], attach=False, name="patches"))
