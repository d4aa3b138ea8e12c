"""Which axis of a module's output holds its features: the last one (hidden states, ``(batch, tokens, d)``) or,
for convolutions and the norms that follow them, axis 1 (channel-first maps, ``(batch, C, H, W)``)."""

from __future__ import annotations

from torch import nn

from ..probe import Seen

CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                 nn.InstanceNorm3d)


def feature_axis(module: nn.Module, seen: Seen) -> int | None:
    """-1 or 1; None when it cannot be told (a block of convolutions with a map of rank 3 or more, say)."""
    rank = len(seen.output_shape)
    if rank < 3:
        return -1
    if isinstance(module, CHANNEL_FIRST):
        return 1
    convolutional = any(isinstance(m, CHANNEL_FIRST) for m in module.modules())
    if rank >= 4 or (convolutional and not any(isinstance(m, nn.Linear) for m in module.modules())):
        return None
    return -1


def channel_last_check(method, position: str, module: nn.Module, seen: Seen) -> None:
    """Refuse modules whose output features are not on its last axis (the methods that add along it)."""
    if feature_axis(module, seen) != -1:
        raise method._unsupported(position, module, "modules whose output has its features on the last axis "
                                  f"(this one's is {list(seen.output_shape)}, channel-first or unknown)")
