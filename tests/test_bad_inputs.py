"""The bad-input catalogue: each bad input raises a named exception whose message names the cause, and leaves the
model untouched (no hook, no delta, same outputs) and nothing written."""

import json
import math
import re

import pytest
import torch
from torch import nn

from deltatune import (AdapterModel, CompacterModel, DeltaBase, IA3Model, LoraModel, LowRankAdapterModel,
                       ParallelAdapterModel, PrefixModel, SoftPromptModel)
from deltatune.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from conftest import first_output, tiny_batch, tiny_model

Q = ["query"]
API = [  # (method, keyword arguments, exception, message)
    (LoraModel, {"modified_modules": Q, "lora_r": True}, TypeError, r"lora_r must be an integer, got True \(bool\)"),
    (LoraModel, {"modified_modules": Q, "lora_r": 0}, ValueError, r"lora_r must be >= 1 and <= 1048576, got 0"),
    (LoraModel, {"modified_modules": Q, "lora_r": 10**12}, ValueError, r"lora_r must be >= 1 and <= 1048576"),
    (LoraModel, {"modified_modules": Q, "lora_r": 2.0}, TypeError, r"lora_r must be an integer, got 2.0"),
    (LoraModel, {"modified_modules": Q, "lora_alpha": "16"}, TypeError, r"lora_alpha must be a finite number, got '16'"),
    (LoraModel, {"modified_modules": Q, "lora_alpha": math.nan}, TypeError, r"lora_alpha must be a finite number"),
    (LoraModel, {"modified_modules": Q, "lora_alpha": math.inf}, TypeError, r"lora_alpha must be a finite number"),
    (LoraModel, {"modified_modules": Q, "lora_alpha": 1e30}, ValueError, r"lora_alpha must be > 0 and <= 100000"),
    (LoraModel, {"modified_modules": Q, "lora_alpha": 0}, ValueError, r"lora_alpha must be > 0"),
    (LoraModel, {"modified_modules": Q, "lora_dropout": "0.1"}, TypeError, r"lora_dropout must be a finite number"),
    (LoraModel, {"modified_modules": Q, "lora_dropout": 1.0}, ValueError, r"lora_dropout must be >= 0 and < 1"),
    (LoraModel, {"modified_modules": Q, "lora_dropout": -0.1}, ValueError, r"lora_dropout must be >= 0 and < 1"),
    (LoraModel, {"modified_modules": Q, "use_dora": "no"}, TypeError, r"use_dora must be true or false, got 'no'"),
    (LoraModel, {"modified_modules": Q, "use_rslora": 1}, TypeError, r"use_rslora must be true or false, got 1"),
    (LoraModel, {"modified_modules": Q, "lora_rank": 4}, TypeError, r"unknown LoraConfig field\(s\) \['lora_rank'\]"),
    (LoraModel, {"modified_modules": [1]}, TypeError, r"modified_modules must be list\[str\] \| None, got \[1\]"),
    (LoraModel, {"modified_modules": ["quary"]}, ValueError, r"'quary' matches no module.*Closest names: 'query'"),
    (LoraModel, {"modified_modules": []}, ValueError, r"modified_modules is empty"),
    (LoraModel, {"modified_modules": Q, "exclude_modules": Q}, ValueError, r"removes every module matched"),
    (LoraModel, {"modified_modules": ["[r](query"]}, ValueError, r"invalid regular expression in module spec"),
    (LoraModel, {"modified_modules": [".query"]}, ValueError, r"is not a dotted module name"),
    (LoraModel, {"modified_modules": ["LayerNorm"]}, TypeError, r"cannot modify .*LayerNorm \(LayerNorm\); it supports "
                                                                r"nn.Linear"),
    (LoraModel, {"modified_modules": Q, "name": "not a name"}, ValueError, r"'not a name' cannot name a delta"),
    (LoraModel, {"modified_modules": Q, "interactive_modify": True}, ValueError,
     r"pass either modified_modules or interactive_modify"),
    (AdapterModel, {"modified_modules": ["output"], "bottleneck_dim": 0}, ValueError, r"bottleneck_dim must be >= 1"),
    (AdapterModel, {"modified_modules": ["output"], "bottleneck_dim": "24"}, TypeError,
     r"bottleneck_dim must be an integer"),
    (AdapterModel, {"modified_modules": ["output"], "non_linearity": "gelux"}, ValueError,
     r"non_linearity must be one of .*gelu_new.*, got 'gelux'"),
    (AdapterModel, {"modified_modules": ["output"], "non_linearity": None}, TypeError,
     r"non_linearity must be a string, got None"),
    (AdapterModel, {"modified_modules": ["output"], "bottleneck_dim": 100_000}, ValueError,
     r"would add [\d,]+ parameters to a backbone of [\d,]+; .*allow_larger_than_backbone=True"),
    (SoftPromptModel, {"init_range": -1.0}, ValueError, r"init_range must be > 0"),
    (SoftPromptModel, {"soft_token_num": 0}, ValueError, r"soft_token_num must be >= 1"),
    (SoftPromptModel, {"soft_token_num": 100}, ValueError, r"need 102 positions, but the model embeds only 64"),
    (SoftPromptModel, {"token_init": "yes"}, TypeError, r"token_init must be true or false"),
    (SoftPromptModel, {"modified_modules": Q}, ValueError, r"takes no modified_modules"),
    (ParallelAdapterModel, {"modified_modules": ["intermediate"], "scaled": "big"}, TypeError,
     r"scaled must be a finite number, got 'big'"),
    (ParallelAdapterModel, {"modified_modules": ["intermediate"], "scaled": math.inf}, TypeError,
     r"scaled must be a finite number"),
    (PrefixModel, {"prefix_token_num": 0}, ValueError, r"prefix_token_num must be >= 1"),
    (PrefixModel, {"reparameterize": "true"}, TypeError, r"reparameterize must be true or false"),
    (CompacterModel, {"modified_modules": ["output"], "hypercomplex_division": 0}, ValueError,
     r"hypercomplex_division must be >= 1"),
    (CompacterModel, {"modified_modules": ["output"], "phm_init_range": 0.0}, ValueError, r"phm_init_range must be > 0"),
    (LowRankAdapterModel, {"modified_modules": ["output"], "low_rank_rank": -1}, ValueError,
     r"low_rank_rank must be >= 1"),
    (IA3Model, {"modified_modules": ["value"], "feedforward_modules": ["intermediate.dense"]}, ValueError,
     r"feedforward_modules must be among the modified modules"),
]


def _untouched(model: nn.Module, reference: torch.Tensor) -> None:
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left"
    assert not any("deltas" in name.split(".") for name, _ in model.named_modules()), "a delta slot was left"
    assert torch.equal(first_output(model, tiny_batch("bert")), reference), "the outputs changed"


@pytest.mark.parametrize("method, options, error, message", API,
                         ids=[f"{m.__name__}-{'-'.join(f'{k}={v!r}'[:24] for k, v in o.items() if k != 'modified_modules') or 'positions'}"
                              for m, o, _, _ in API])
def test_a_bad_argument_is_named_and_changes_nothing(method, options, error, message):
    model = tiny_model("bert")
    reference = first_output(model, tiny_batch("bert"))
    with pytest.raises(error, match=message):
        method(model, **options)
    _untouched(model, reference)


@pytest.mark.parametrize("backbone", [None, "bert-base-uncased", {}, torch.ones(2)])
def test_a_backbone_that_is_not_a_module_is_named(backbone):
    with pytest.raises(TypeError, match=f"backbone_model must be a torch.nn.Module, got {type(backbone).__name__}"):
        LoraModel(backbone, Q)


def _edit_config(folder, change):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config = change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _set(path: str, value):
    def change(config):
        target = config
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
        return config
    return change


def _drop(key: str):
    return lambda config: {k: v for k, v in config.items() if k != key}


CHECKPOINTS = [  # (how the saved folder is damaged, exception, message)
    (lambda f: _edit_config(f, lambda c: 3), ValueError, r"holds a JSON int, not an object"),
    (lambda f: _edit_config(f, _set("format_version", "1")), ValueError, r"'format_version' must be a JSON int"),
    (lambda f: _edit_config(f, _set("format_version", 99)), ValueError, r"format version 99, newer than"),
    (lambda f: _edit_config(f, _set("config", None)), ValueError, r"'config' must be a JSON dict"),
    (lambda f: _edit_config(f, _set("backbone", "bert")), ValueError, r"'backbone' must be a JSON dict"),
    (lambda f: _edit_config(f, _set("positions", "abc")), ValueError, r"'positions' must be a list of strings"),
    (lambda f: _edit_config(f, _set("positions", ["bert.nothing"])), ValueError, r"has no module\(s\) \['bert.nothing'\]"),
    (lambda f: _edit_config(f, _set("unfrozen_backbone", ["missing.weight"])), ValueError,
     r"saved backbone parameters this BertForSequenceClassification lacks: \['missing.weight'\]"),
    (lambda f: _edit_config(f, _set("unfrozen_backbone", "classifier")), ValueError,
     r"'unfrozen_backbone' must be a list of strings"),
    (lambda f: _edit_config(f, _set("config.name", "x")), TypeError, r"unknown LoraConfig field\(s\) \['name'\]"),
    (lambda f: _edit_config(f, _set("config.interactive_modify", 8765)), TypeError,
     r"unknown LoraConfig field\(s\) \['interactive_modify'\]"),
    (lambda f: _edit_config(f, _set("config.attach", False)), TypeError, r"unknown LoraConfig field\(s\) \['attach'\]"),
    (lambda f: _edit_config(f, _set("config.lora_alpha", 1e30)), ValueError, r"lora_alpha must be > 0 and <= 100000"),
    (lambda f: _edit_config(f, _set("config.lora_r", "8")), TypeError, r"lora_r must be an integer, got '8'"),
    (lambda f: _edit_config(f, _set("config.modified_modules", "query")), TypeError,
     r"modified_modules must be list\[str\] \| None, got 'query'"),
    (lambda f: _edit_config(f, _set("delta_type", "lorax")), ValueError, r"holds a 'lorax' delta; known types: "),
    (lambda f: _edit_config(f, _drop("positions")), ValueError, r"lacks the field 'positions'"),
    (lambda f: (f / CONFIG_FILE).write_text("{not json"), ValueError, r"is not valid JSON"),
    (lambda f: (f / WEIGHTS_FILE).write_bytes(b"garbage"), ValueError, r"is not a readable safetensors file"),
    (lambda f: (f / WEIGHTS_FILE).unlink(), FileNotFoundError, r"delta_model.safetensors is missing"),
    (lambda f: (f / CONFIG_FILE).unlink(), FileNotFoundError, r"delta_config.json is missing"),
    (lambda f: _legacy(f, {"x": 1}), ValueError, r"does not hold a mapping of names to tensors"),
    (lambda f: _nan_weights(f), ValueError, r"holds NaN or infinite values in \['deltas\."),
]


def _legacy(folder, content) -> None:
    (folder / WEIGHTS_FILE).unlink()
    torch.save(content, folder / "delta_model.bin")


def _nan_weights(folder) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    next(iter(tensors.values())).fill_(math.nan)
    save_file(tensors, folder / WEIGHTS_FILE)  # a file saved by other means, so without the embedded config


@pytest.mark.parametrize("damage, error, message", CHECKPOINTS, ids=[m[:40] for _, _, m in CHECKPOINTS])
def test_a_damaged_or_hostile_checkpoint_is_refused_by_name_and_attaches_nothing(damage, error, message, tmp_path):
    delta = LoraModel(tiny_model("bert"), Q)
    with torch.no_grad():
        delta.delta_parameters()[1].normal_()
    folder = delta.save_finetuned(tmp_path / "ckpt")
    damage(folder)
    model = tiny_model("bert")
    reference = first_output(model, tiny_batch("bert"))
    with pytest.raises(error, match=message):
        DeltaBase.from_finetuned(folder, model)
    _untouched(model, reference)



CLI = [  # (arguments of deltatune train, message on stderr)
    (["--delta", "lorax"], r"unknown delta type 'lorax'; known: adapter, bitfit"),
    (["--delta-config", "attach=false"], r"unknown LoraConfig field\(s\) \['attach'\]"),
    (["--delta-config", "interactive_modify=8765"], r"unknown LoraConfig field\(s\) \['interactive_modify'\]"),
    (["--delta-config", "lora_r=0"], r"lora_r must be >= 1 and <= 1048576, got 0"),
    (["--delta-config", '{"lora_alpha": "big"}'], r"lora_alpha must be a finite number, got 'big'"),
    (["--delta", "adapter", "--delta-config", "non_linearity=gelux"], r"non_linearity must be one of"),
]


@pytest.mark.parametrize("arguments, message", CLI, ids=[" ".join(a)[:40] for a, _ in CLI])
def test_a_bad_command_line_is_named_and_writes_nothing(arguments, message, tmp_path, capsys):
    from deltatune.cli import main

    out = tmp_path / "run"
    assert main(["train", *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deltatune train: error: ") and re.search(message, error), error
    assert not out.exists()
