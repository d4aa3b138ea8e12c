"""One training step (forward, backward, AdamW) of a variant: ``ours-<method>``, ``peft-<method>`` or ``full``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models import Setting
from .variants import full, ours, peft_model


def build_training(setting: Setting, variant: str, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    model = setting.load()
    if variant == "full":
        model = full(model)
    elif variant.startswith("ours-"):
        ours(variant.removeprefix("ours-"), setting, model)
    elif variant.startswith("peft-"):
        model = peft_model(variant.removeprefix("peft-"), setting, model)
    else:
        raise ValueError(variant)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    model.train()

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
