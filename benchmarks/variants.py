"""The same delta built by deltatune and by PEFT on the same modules (names resolved once, by deltatune's
addressing, and given to both), plus full fine-tuning."""

from __future__ import annotations

from torch import nn

from deltatune import IA3Model, LoraModel, PrefixModel, SoftPromptModel
from deltatune.addressing import resolve_positions

from .models import Setting

METHODS = ["lora", "ia3", "prefix", "prompt"]
VIRTUAL_TOKENS = 16


def head(setting: Setting) -> list[str]:
    return ["classifier"] if setting.task == "SEQ_CLS" else []


def ours(method: str, setting: Setting, model: nn.Module, **options):
    """Build our delta, freeze the rest (the new head stays trainable); returns the delta."""
    if method == "lora":
        delta = LoraModel(model, resolve_positions(model, setting.lora_modules["q,v"]), lora_r=8, lora_alpha=16,
                          **options)
    elif method == "ia3":
        delta = IA3Model(model, resolve_positions(model, setting.ia3["modified"]),
                         feedforward_modules=resolve_positions(model, setting.ia3["feedforward"]), **options)
    elif method == "prefix":
        delta = PrefixModel(model, prefix_token_num=VIRTUAL_TOKENS, reparameterize=False, **options)
    elif method == "prompt":
        delta = SoftPromptModel(model, soft_token_num=VIRTUAL_TOKENS, **options)
    else:
        raise ValueError(method)
    return delta.freeze_module(exclude=["deltas", *head(setting)])


def peft_config(method: str, setting: Setting, model: nn.Module):
    import peft

    task = getattr(peft.TaskType, setting.task)
    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type=task,
                               target_modules=resolve_positions(model, setting.lora_modules["q,v"]))
    if method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=resolve_positions(model, setting.ia3["modified"]),
                              feedforward_modules=resolve_positions(model, setting.ia3["feedforward"]))
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=VIRTUAL_TOKENS)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(method)


def peft_model(method: str, setting: Setting, model: nn.Module, adapter_name: str = "default"):
    import peft

    return peft.get_peft_model(model, peft_config(method, setting, model), adapter_name=adapter_name)


def full(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
