"""DeltaBase lifecycle: freezing, state_dict filtering, merge/unmerge, save/load and their errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import AdapterModel, BitFitModel, DeltaBase, LoraModel
from deltatune.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from conftest import first_output, tiny_batch, tiny_model


def _randomize(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(std=0.1)


def test_freeze_module_keeps_deltas_and_named_modules_trainable():
    model = tiny_model("bert")
    delta = LoraModel(model, ["query", "value"]).freeze_module(exclude=["deltas", "classifier"])
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {*(k for k in trainable if ".deltas.lora." in k), "classifier.weight", "classifier.bias"}
    assert len([k for k in trainable if "deltas" in k]) == 8
    assert delta.num_trainable_parameters() == 4 * 2 * 8 * 32 + 32 * 2 + 2
    # set_state_dict: the backbone's own state_dict now holds only what is trained
    assert set(model.state_dict()) == trainable
    delta.detach()
    assert "bert.embeddings.word_embeddings.weight" in model.state_dict(), "detach removes the filter"


def test_freeze_module_only_unfreezes_its_own_delta():
    model = tiny_model("bert")
    first = LoraModel(model, ["query"])
    second = LoraModel(model, ["query"])
    second.freeze_module()
    assert all(p.requires_grad for p in second.delta_parameters())
    assert not any(p.requires_grad for p in first.delta_parameters())


def test_freeze_module_exclude_that_matches_nothing_is_an_error():
    delta = LoraModel(tiny_model("bert"), ["query"])
    with pytest.raises(ValueError, match="freeze_module exclude entry 'clasifier'"):
        delta.freeze_module(exclude=["deltas", "clasifier"])


@pytest.mark.parametrize("family,positions", [("bert", ["query", "value"]), ("gpt2", ["c_attn", "c_fc"]),
                                              ("llama", ["q_proj", "embed_tokens"])])
def test_lora_merge_matches_unmerged_and_removes_hooks(family, positions):
    model = tiny_model(family)
    batch = tiny_batch(family)
    reference = first_output(model, batch)
    delta = LoraModel(model, positions)
    _randomize(delta)
    unmerged = first_output(model, batch)
    delta.merge()
    assert not any(m._forward_hooks for m in model.modules())
    # merged weights round differently from the two-step product: equal up to float32 round-off
    torch.testing.assert_close(first_output(model, batch), unmerged, rtol=0, atol=1e-5)
    delta.unmerge()
    torch.testing.assert_close(first_output(model, batch), unmerged, rtol=0, atol=1e-5)
    delta.merge(exact=True).unmerge()
    delta.detach()
    torch.testing.assert_close(first_output(model, batch), reference, rtol=0, atol=1e-5)


def test_exact_merge_restores_the_original_weights_bit_for_bit():
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = LoraModel(model, ["query"])
    _randomize(delta)
    delta.merge(exact=True)
    delta.detach()  # detaching a merged delta unmerges it first
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bitfit_merge_creates_a_bias_where_there_was_none():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    delta = BitFitModel(model, ["q_proj", "input_layernorm"], exclude_modules=["input_layernorm"])
    _randomize(delta)
    unmerged = first_output(model, batch)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.bias is None
    delta.merge()
    assert torch.equal(q_proj.bias, delta.deltas["model.layers.0.self_attn.q_proj"].bias)
    torch.testing.assert_close(first_output(model, batch), unmerged, rtol=0, atol=1e-6)
    delta.unmerge()
    assert q_proj.bias is None and "bias" not in dict(q_proj.named_parameters())


def test_bitfit_refuses_to_merge_into_a_module_without_a_bias_slot_and_changes_nothing():
    model = tiny_model("bert")
    delta = BitFitModel(model, ["attention.output", "query"])
    _randomize(delta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="not BertSelfOutput"):
        delta.merge()
    assert not delta.merged and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_is_not_mergeable():
    with pytest.raises(TypeError, match="cannot be merged"):
        AdapterModel(tiny_model("bert"), ["output"]).merge()


def test_probe_restores_training_flags_and_accepts_a_pseudo_input():
    model = tiny_model("bert").train()
    model.bert.encoder.layer[0].eval()
    LoraModel(model, ["query"], pseudo_input={"input_ids": torch.tensor([[5, 6, 7]])})
    assert model.training and not model.bert.encoder.layer[0].training
    assert model.bert.encoder.layer[1].training


def test_probe_failure_names_the_cause():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="pass pseudo_input"):  # a ReLU's shapes need a forward pass
        AdapterModel(model, ["1"])
    with pytest.raises(RuntimeError, match="probe forward pass of Sequential failed: RuntimeError"):
        AdapterModel(model, ["1"], pseudo_input=torch.ones(3, 5))
    delta = AdapterModel(model, ["1"], pseudo_input=torch.ones(3, 4), bottleneck_dim=2)
    assert delta.deltas["1"].down.in_features == 8


def test_delta_parameters_take_the_backbone_dtype():
    model = tiny_model("bert").double()
    for method, positions in ((LoraModel, ["query"]), (AdapterModel, ["output"]), (BitFitModel, ["LayerNorm"])):
        delta = method(model, positions)
        assert {p.dtype for p in delta.delta_parameters()} == {torch.float64}


def test_unknown_hyperparameter_lists_the_fields():
    with pytest.raises(TypeError, match=r"unknown LoraConfig field\(s\) \['lora_rank'\]; the fields are: .*lora_r"):
        LoraModel(tiny_model("bert"), ["query"], lora_rank=4)


def test_bad_hyperparameter_values():
    with pytest.raises(ValueError, match="lora_r must be >= 1 and <= 1048576, got 0"):
        LoraModel(tiny_model("bert"), ["query"], lora_r=0)
    with pytest.raises(ValueError, match="non_linearity must be one of .*gelu_new.*, got .gelux."):
        AdapterModel(tiny_model("bert"), ["output"], non_linearity="gelux")


def test_lora_on_an_unsupported_module_type():
    with pytest.raises(TypeError, match="cannot modify bert.encoder.layer.0.attention.output .*supports nn.Linear"):
        LoraModel(tiny_model("bert"), ["attention.output"])


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture()
def saved(tmp_path):
    model = tiny_model("bert")
    delta = LoraModel(model, ["query", "value"], lora_r=4).freeze_module(exclude=["deltas", "classifier"])
    _randomize(delta)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    out = first_output(model, tiny_batch("bert"))
    return delta.save_finetuned(tmp_path / "ckpt"), out


def test_checkpoint_holds_only_the_delta_and_unfrozen_parameters(saved):
    folder, _ = saved
    tensors = load_file(folder / WEIGHTS_FILE)
    assert sorted(k for k in tensors if k.startswith("backbone.")) == ["backbone.classifier.bias",
                                                                      "backbone.classifier.weight"]
    assert len([k for k in tensors if k.startswith("deltas.")]) == 8
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["delta_type"] == "lora" and config["config"]["lora_r"] == 4
    assert config["backbone"]["class"] == "BertForSequenceClassification" and len(config["positions"]) == 4
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_from_finetuned_restores_the_delta_and_the_unfrozen_head(saved):
    folder, out = saved
    model = tiny_model("bert")
    delta = LoraModel.from_finetuned(folder, model)
    assert delta.config.lora_r == 4
    assert torch.equal(first_output(model, tiny_batch("bert")), out)


def test_loading_onto_the_wrong_backbone(saved):
    folder, _ = saved
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="trained on a BertForSequenceClassification backbone, this one is GPT2"):
        DeltaBase.from_finetuned(folder, gpt2)
    assert not any("deltas" in k for k in gpt2.state_dict())


def test_loading_onto_a_backbone_with_other_shapes(saved):
    import transformers as tf

    folder, _ = saved
    wider = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64))
    with pytest.warns(UserWarning, match="differ"), pytest.raises(ValueError, match="does not fit") as info:
        DeltaBase.from_finetuned(folder, wider)
    assert "checkpoint [4, 32] torch.float32, delta expects [4, 48]" in str(info.value)
    assert not any("deltas" in k for k in wider.state_dict()), "nothing attached after a failed load"


def test_loading_with_the_wrong_method_class(saved):
    with pytest.raises(TypeError, match="holds a 'lora' delta, not 'adapter'; use LoraModel"):
        AdapterModel.from_finetuned(saved[0], tiny_model("bert"))


def test_missing_or_corrupt_weights(saved):
    folder, _ = saved
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DeltaBase.from_finetuned(folder, tiny_model("bert"))
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_FILE} is missing"):
        DeltaBase.from_finetuned(folder, tiny_model("bert"))


def test_edited_config(saved):
    folder, _ = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["config"]["lora_rank"] = 3
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(TypeError, match="unknown LoraConfig field"):
        DeltaBase.from_finetuned(folder, tiny_model("bert"))
    config["config"].pop("lora_rank")
    config["config"]["lora_r"] = 8
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="missing|delta expects"):
        DeltaBase.from_finetuned(folder, model)
    assert not any(m._forward_hooks for m in model.modules())
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeltaBase.from_finetuned(folder, tiny_model("bert"))


def test_save_refuses_to_overwrite_a_foreign_folder_and_replaces_its_own(saved, tmp_path):
    folder, _ = saved
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    delta = LoraModel(tiny_model("bert"), ["query"])
    with pytest.raises(FileExistsError, match="not a delta checkpoint"):
        delta.save_finetuned(foreign)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    delta.save_finetuned(folder)
    assert json.loads((folder / CONFIG_FILE).read_text())["config"]["lora_r"] == 8


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import deltatune.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        LoraModel(tiny_model("bert"), ["query"]).save_finetuned(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_summary_and_log_report_counts_and_ratios(capsys):
    delta = LoraModel(tiny_model("bert"), ["query", "value"])
    assert "delta parameters:     2,048" in delta.summary()
    returned = delta.log()
    text = capsys.readouterr().out
    assert text == returned  # captured output is not a terminal: plain text, no ANSI codes
    assert "LoraModel 'lora' (input->output) on 4 modules" in text
    assert "delta: 2,048 (" in text and "\x1b[" not in text


def test_two_saved_deltas_of_one_type_load_side_by_side(saved, tmp_path):
    folder, _ = saved
    model = tiny_model("bert")
    first = DeltaBase.from_finetuned(folder, model)
    before = first_output(model, tiny_batch("bert"))
    with pytest.raises(ValueError, match="already loaded on this backbone as delta 'lora', so it would apply twice"):
        DeltaBase.from_finetuned(folder, model)
    assert torch.equal(first_output(model, tiny_batch("bert")), before), "the refused load attached nothing"
    second = DeltaBase.from_finetuned(folder, model, name="copy")  # on purpose
    assert (first.name, second.name) == ("lora", "copy")
    second.detach()
    assert torch.equal(first_output(model, tiny_batch("bert")), saved[1])


def test_lora_dropout_acts_in_training_only():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    delta = LoraModel(model, ["query"], lora_dropout=0.5)
    _randomize(delta)
    evaluated = first_output(model, batch)
    assert torch.equal(first_output(model, batch), evaluated), "no dropout in eval mode"
    model.train()
    for module in model.modules():  # only LoRA's dropout stays active
        if isinstance(module, nn.Dropout) and module is not delta.deltas["bert.encoder.layer.0.attention.self.query"].dropout:
            module.eval()
    torch.manual_seed(0)
    assert not torch.equal(first_output(model, batch), evaluated)


@pytest.mark.parametrize("damage,message", [
    ("extra", "unexpected deltas.extra"),
    ("missing", "missing deltas.bert.encoder.layer.0.attention.self.query.lora_A"),
    ("dtype", "checkpoint [4, 32] torch.int32, delta expects [4, 32] torch.float32"),
])
def test_damaged_tensor_files_are_named_precisely(saved, damage, message):
    from safetensors.torch import save_file

    folder, _ = saved
    tensors = load_file(folder / WEIGHTS_FILE)
    key = "deltas.bert.encoder.layer.0.attention.self.query.lora_A"
    if damage == "extra":
        tensors["deltas.extra"] = torch.zeros(1)
    elif damage == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key].to(torch.int32)  # another precision would be cast; another kind is refused
    save_file(tensors, folder / WEIGHTS_FILE)
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DeltaBase.from_finetuned(folder, model)
    assert not any(m._forward_hooks for m in model.modules()), "nothing attached after a failed load"


def test_legacy_bin_is_read_only_as_plain_tensors(saved):
    folder, out = saved
    tensors = load_file(folder / WEIGHTS_FILE)
    (folder / WEIGHTS_FILE).unlink()
    torch.save(tensors, folder / "delta_model.bin")
    model = tiny_model("bert")
    DeltaBase.from_finetuned(folder, model)
    assert torch.equal(first_output(model, tiny_batch("bert")), out)

    class Payload:  # a pickle that would run code if loaded without weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, folder / "delta_model.bin")
    with pytest.raises(ValueError, match="refused with weights_only=True"):
        DeltaBase.from_finetuned(folder, tiny_model("bert"))


def test_same_architecture_other_weights_loads_with_a_warning(saved):
    folder, _ = saved
    torch.manual_seed(123)

    other = tiny_model("bert")
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.warns(UserWarning, match="same architecture but other weights"):
        DeltaBase.from_finetuned(folder, other)


def test_unfreeze_module_restores_what_freezing_changed():
    model = tiny_model("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # the user's own choice, kept
    before = {k: p.requires_grad for k, p in model.named_parameters()}
    keys = set(model.state_dict())
    delta = LoraModel(model, ["query"]).freeze_module(exclude=["deltas", "classifier"])
    assert set(model.state_dict()) < keys | {k for k in model.state_dict() if ".deltas." in k}
    delta.detach()
    assert not any(p.requires_grad for k, p in model.named_parameters() if "classifier" not in k), "still frozen"
    delta.unfreeze_module()
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before
    assert set(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match="has not frozen the backbone"):
        delta.unfreeze_module()


def test_names_stay_reserved_while_a_delta_is_detached_or_merged():
    model = tiny_model("bert")
    first = LoraModel(model, ["query"])
    first.detach()
    second = LoraModel(model, ["query"])
    first.attach()  # its name was not given away
    assert (first.name, second.name) == ("lora", "lora_1")
    bitfit = BitFitModel(model, ["query"]).merge()
    again = BitFitModel(model, ["query"])
    bitfit.unmerge()
    assert (bitfit.name, again.name) == ("bitfit", "bitfit_1")
    with pytest.raises(ValueError, match="a delta named 'lora' already exists on this backbone"):
        LoraModel(model, ["value"], name="lora")


def test_a_frozen_state_dict_says_it_is_a_subset_once(tmp_path):
    from deltatune.base import DeltaStateDictWarning

    model = tiny_model("bert")
    lora = LoraModel(model, ["query"]).freeze_module()
    with pytest.warns(DeltaStateDictWarning, match=r"state_dict\(\) holds only the \d+ trainable tensors while "
                                                   r"delta 'lora' has frozen the backbone .* reloads with a random"):
        model.save_pretrained(tmp_path / "subset")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltaStateDictWarning)
        assert set(model.state_dict()) == {k for k, p in model.named_parameters() if p.requires_grad}  # once only
    lora.unfreeze_module()
    assert len(model.state_dict()) > 4 * len(lora.positions)  # the whole model again


def test_a_detached_delta_follows_the_model_moved_meanwhile():
    """detach(); model.double(); attach() used to fail with a dtype mismatch: the detached delta belonged to no
    module, so .double() passed it by."""
    from conftest import tiny_model

    from deltatune import AdapterModel, LoraModel

    model = tiny_model("llama")
    lora = LoraModel(model, ["q_proj", "v_proj"])
    adapter = AdapterModel(model, ["mlp"])
    lora.detach()
    adapter.detach()
    model.double()
    lora.attach()
    adapter.attach()
    ids = torch.randint(3, 96, (1, 5))
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in lora.delta_parameters() + adapter.delta_parameters())


def test_a_delta_is_a_module_owning_its_delta_modules_and_not_the_backbone(tmp_path):
    """.to(), .double(), .eval(), parameters() and state_dict() reach a delta's modules, attached or not, and never
    the backbone; the checkpoint format is delta_state_dict()'s."""
    from conftest import tiny_model

    from deltatune import LoraModel

    model = tiny_model("llama")
    lora = LoraModel(model, ["q_proj", "v_proj"], lora_dropout=0.1)
    assert isinstance(lora, torch.nn.Module)
    assert {id(p) for p in lora.parameters()} == {id(p) for p in lora.delta_parameters()}
    backbone = {id(p) for name, p in model.named_parameters() if ".deltas." not in name}
    assert not backbone & {id(p) for p in lora.parameters()}
    assert set(lora.state_dict()) == {f"modules_by_position.{p.replace('.', '/')}.{n}"
                                      for p, d in lora.deltas.items() for n in d.state_dict()}
    lora.detach()
    lora.double()
    assert all(p.dtype == torch.float64 for p in lora.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the backbone is not the delta's to move"
    lora.eval()
    assert not any(m.training for m in lora.modules())
    lora.attach()  # back on a float32 model: the delta takes its host's dtype again
    assert all(p.dtype == torch.float32 for p in lora.parameters())
    with torch.no_grad():
        assert model(input_ids=torch.randint(3, 96, (1, 5))).logits.dtype == torch.float32
    assert set(lora.delta_state_dict()) == {f"deltas.{p}.{n}" for p, d in lora.deltas.items() for n in d.state_dict()}
