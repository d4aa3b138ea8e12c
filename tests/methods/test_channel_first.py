"""Convolutions keep their features on axis 1: BitFit shifts the channels, the methods that add along the last
axis refuse such outputs instead of acting on the width."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from deltatune import AdapterModel, BitFitModel, IA3Model, ParallelAdapterModel

IMAGES = torch.randn(2, 3, 10, 12)  # width 12 differs from every channel count


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(OrderedDict(conv2=nn.Conv2d(8, 4, 3), gn=nn.GroupNorm(2, 4)))
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, bias=False), bn=nn.BatchNorm2d(8), act=nn.ReLU(),
                                     block=block)).eval()


def test_bitfit_on_convolutions_and_norms_shifts_each_channel_and_merges():
    model = _convnet()
    delta = BitFitModel(model, ["conv", "bn", "conv2", "gn"], pseudo_input=IMAGES)
    assert [tuple(p.shape) for p in delta.delta_parameters()] == [(8,), (8,), (4,), (4,)]
    shift = torch.arange(4.0)
    with torch.no_grad():
        delta.deltas["block.conv2"].bias.copy_(shift)
        features, conv = model[:3](IMAGES), model.block.conv2
        expected = nn.functional.conv2d(features, conv.weight, conv.bias + shift)
        torch.testing.assert_close(conv(features), expected)  # the tuned bias, channel by channel
        tuned = model(IMAGES)
        delta.merge()
        assert model.conv.bias is not None and model.conv.bias.shape == (8,)  # a bias-free conv got one
        torch.testing.assert_close(model(IMAGES), tuned, rtol=0, atol=1e-6)  # float round-off of b + Δb


@pytest.mark.parametrize("method, options", [(AdapterModel, {}), (IA3Model, {}), (ParallelAdapterModel, {})])
def test_methods_that_add_along_the_last_axis_refuse_a_channel_first_output(method, options):
    model = _convnet()
    reference = model(IMAGES)
    with pytest.raises(TypeError, match=r"cannot modify bn \(BatchNorm2d\); it supports .*features on the last axis"):
        method(model, ["bn"], pseudo_input=IMAGES, **options)
    assert torch.equal(model(IMAGES), reference) and not any(m._forward_hooks for m in model.modules())


def test_a_block_of_convolutions_is_refused_since_its_channel_axis_cannot_be_told():
    with pytest.raises(TypeError, match=r"cannot modify block \(Sequential\); it supports outputs whose channel axis "
                                        r"is known.*\[2, 4, 6, 8\]"):
        BitFitModel(_convnet(), ["block"], pseudo_input=IMAGES)
