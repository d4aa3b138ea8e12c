"""Accuracy and macro-F1 of predicted label indices."""

from __future__ import annotations

import torch


def scores(predicted: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, float]:
    """``accuracy`` and ``f1`` (macro: the mean over labels that occur in gold or predictions of per-label F1)."""
    f1s = []
    for label in range(num_labels):
        tp = ((predicted == label) & (gold == label)).sum().item()
        fp = ((predicted == label) & (gold != label)).sum().item()
        fn = ((predicted != label) & (gold == label)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": (predicted == gold).float().mean().item(), "f1": sum(f1s) / max(len(f1s), 1)}
