"""LoRA on a convolution (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``), built as PEFT builds it: ``A`` convolves
the input to ``r`` channels with the host's kernel size, stride, padding and dilation, ``B`` maps ``r`` channels to
``out`` pointwise (a 1×…×1 kernel)::

    h = conv(x, W) + (α/r) · conv(conv(dropout(x), A), B)

Because ``B`` is pointwise, the update is one convolution of the host's form, with the weight

    ΔW[o, i, k] = (α/r) · Σ_j B[o, j] · A[j, i, k]

so it merges into ``W``.  Refused, because the update would not be one convolution of the host's form: grouped
convolutions, and padding modes other than zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def unsupported_convolution(host: nn.Module) -> str | None:
    """Why LoRA cannot adapt this convolution, or None."""
    if host.groups != 1:
        return f"it is grouped (groups={host.groups}), so an update through all channels is no grouped weight"
    if host.padding_mode != "zeros":
        return f"it pads by {host.padding_mode!r}, which the update's convolution would not repeat"
    return None


class LoraConvLayer(nn.Module):
    """``h <- h + (α/r) · conv(conv(dropout(x), A), B)`` for one convolution."""

    embedding = False  # tensors named as PEFT names a Linear's (lora_A.weight, lora_B.weight)

    def __init__(self, host: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__()
        weight = host.weight  # (out, in, *kernel)
        factory = {"device": weight.device, "dtype": weight.dtype}
        kernel = weight.shape[2:]
        self.r, self.out_features = r, weight.shape[0]
        self.lora_A = nn.Parameter(torch.empty(r, weight.shape[1], *kernel, **factory))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, *(1,) * len(kernel), **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.convolve = _FUNCTIONS[len(kernel)]
        self.geometry = {"stride": host.stride, "padding": host.padding, "dilation": host.dilation}

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = self.convolve(self.dropout(x) if self.dropout is not None else x, self.lora_A, **self.geometry)
        return torch.add(h, self.convolve(a, self.lora_B), alpha=self.scaling)

    def weight_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        update = self.lora_B.flatten(1) @ self.lora_A.flatten(1)  # (out, in · kernel)
        return {"weight": (update * self.scaling).view_as(host.weight)}
