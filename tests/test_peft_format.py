"""PEFT interop for LoRA, both ways, with the real peft package (dev extra)."""

import json

import pytest
import torch
import transformers as tf

from deltatune import DeltaBase, LoraModel, from_peft
from deltatune.cli.serve import labels_of
from deltatune.pooling import use_mean

from conftest import VOCAB, first_output, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # run at both ends of the supported transformers range

peft = pytest.importorskip("peft")

CASES = [
    ("bert", ["query", "value"], {}),
    ("gpt2", ["c_attn", "c_fc"], {}),  # Conv1D: PEFT's fan_in_fan_out
    ("llama", ["q_proj", "v_proj", "embed_tokens"], {"use_rslora": True}),
    ("bert", ["query", "value"], {"use_dora": True}),
    ("gpt2", ["c_attn"], {"use_dora": True}),
]


def _randomize(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("family,targets,options", CASES)
def test_export_loads_in_peft_with_the_same_outputs(family, targets, options, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    delta = LoraModel(model, targets, lora_r=4, lora_alpha=8, **options)
    _randomize(delta)
    ours = first_output(model, batch)
    delta.export_peft(tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter").eval()
    # same formula, different kernels (PEFT scales after the product): equal up to float32 round-off
    torch.testing.assert_close(first_output(peft_model, batch), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,targets,options", CASES)
def test_import_from_peft_gives_the_same_outputs(family, targets, options, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options)
    peft_model = peft.get_peft_model(tiny_model(family), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    batch = tiny_batch(family)
    expected = first_output(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = tiny_model(family)
    delta = from_peft(tmp_path / "adapter", model)
    assert delta.config.lora_r == 4 and delta.config.use_dora == options.get("use_dora", False)
    assert len(delta.positions) == len([n for n, m in peft_model.named_modules() if n.endswith(tuple(targets))
                                        and hasattr(m, "lora_A")])
    torch.testing.assert_close(first_output(model, batch), expected, rtol=0, atol=1e-5)


def test_an_adapter_on_some_layers_imports_onto_those(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    peft_model = peft.get_peft_model(tiny_model("llama"), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    expected = first_output(peft_model, tiny_batch("llama"))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    delta = from_peft(tmp_path / "adapter", model)
    assert delta.positions == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(first_output(model, tiny_batch("llama")), expected, rtol=0, atol=1e-5)


def test_per_module_ranks_and_alphas_cross_both_ways_as_peft_reads_them(tmp_path):
    # Overlapping alpha keys: PEFT takes the first that matches, and sorts the keys when it saves, so the file
    # (layer 1's o_proj at alpha 5) differs from the model that wrote it (3): what PEFT loads is the reference.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                             rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6, "k_proj": 3},
                             alpha_pattern={"o_proj": 3, r"^model\.layers\.1\.self_attn\.o_proj": 5})
    written = peft.get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        for name, p in written.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    written.save_pretrained(tmp_path / "adapter")
    batch = tiny_batch("llama")
    expected = first_output(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval(), batch)

    model = tiny_model("llama")
    delta = from_peft(tmp_path / "adapter", model)
    torch.testing.assert_close(first_output(model, batch), expected, rtol=0, atol=1e-5)
    assert {p.split("layers.")[1]: (d.r, d.scaling) for p, d in delta.deltas.items() if "layers.1" in p} == {
        "1.self_attn.q_proj": (4, 2.0), "1.self_attn.v_proj": (6, 8 / 6), "1.self_attn.o_proj": (4, 5 / 4)}
    assert "[r]k_proj" not in delta.config.rank_pattern  # it decided nothing, in PEFT as here

    delta.export_peft(tmp_path / "ours")
    exported = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert exported["alpha_pattern"] == {r"^model\.layers\.0\.self_attn\.o_proj": 3,  # overlapping: by full name
                                         r"^model\.layers\.1\.self_attn\.o_proj": 5}
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(first_output(loaded, batch), expected, rtol=0, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")  # sorted by PEFT: the same adapter
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again").eval()
    torch.testing.assert_close(first_output(again, batch), expected, rtol=0, atol=1e-5)


def test_unsupported_peft_features_are_refused(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["query"], bias="lora_only")
    peft.get_peft_model(tiny_model("bert"), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="bias='lora_only'"):
        from_peft(tmp_path / "adapter", tiny_model("bert"))


HEADS = {"bert": ["classifier"], "roberta": ["classifier.dense", "classifier.out_proj"]}  # one Linear; two


def _head(model) -> list[str]:
    return [n for n, _ in model.classifier.named_parameters(prefix="classifier")]


@pytest.mark.parametrize("family", HEADS)
def test_a_head_trained_with_the_delta_crosses_over_as_modules_to_save(family, tmp_path):
    model = tiny_model(family)
    delta = LoraModel(model, ["query", "value"], lora_r=4).freeze_module(exclude=["deltas", "classifier"])
    _randomize(delta)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(torch.randn_like(p))
    batch = tiny_batch(family)
    ours = first_output(model, batch)
    delta.export_peft(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == HEADS[family]
    peft_model = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter").eval()
    torch.testing.assert_close(first_output(peft_model, batch), ours, rtol=0, atol=1e-5)
    back = tiny_model(family)
    assert from_peft(tmp_path / "adapter", back).unfrozen_backbone == _head(back)
    assert torch.equal(first_output(back, batch), ours)


def test_peft_auto_classes_find_the_backbone_the_delta_was_exported_from(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model("bert").save_pretrained(tmp_path / "backbone")
    model = tf.BertForSequenceClassification.from_pretrained(tmp_path / "backbone").eval()
    delta = LoraModel(model, ["query", "value"], lora_r=4).freeze_module(exclude=["deltas", "classifier"])
    _randomize(delta)
    delta.export_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "backbone")
    for auto in (peft.AutoPeftModel, peft.AutoPeftModelForSequenceClassification):
        loaded = auto.from_pretrained(tmp_path / "adapter").eval()  # the backbone is read from the recorded folder
        torch.testing.assert_close(first_output(loaded, tiny_batch("bert")), first_output(model, tiny_batch("bert")),
                                   rtol=0, atol=1e-5)
    LoraModel(tiny_model("bert"), ["query"]).export_peft(tmp_path / "built")  # from a config: no folder to name
    assert json.loads((tmp_path / "built" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


SEQ_CLS = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"]}


def _tiny_distilbert():
    torch.manual_seed(0)
    return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)).eval()


def _classifier(family):
    return _tiny_distilbert() if family == "distilbert" else tiny_model(family)


def _peft_classifier(family, folder, **options):
    """A PEFT SEQ_CLS LoRA adapter (PEFT adds modules_to_save=["classifier", "score"]), trained by random steps."""
    targets = ["q_lin", "v_lin"] if family == "distilbert" else ["query", "value"]
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets, **options)
    peft_model = peft.get_peft_model(_classifier(family), config).eval()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # LoRA and PEFT's copy of the head
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(folder)
    return first_output(peft_model, tiny_batch("bert"))


@pytest.mark.parametrize("family", SEQ_CLS)
def test_a_peft_sequence_classification_adapter_brings_its_head(family, tmp_path):
    expected = _peft_classifier(family, tmp_path / "adapter")
    model = _classifier(family)
    delta = from_peft(tmp_path / "adapter", model)
    heads = [n for n, _ in model.named_parameters() if n.split(".")[0] in SEQ_CLS[family]]
    assert delta.unfrozen_backbone == heads  # in the backbone's order, the last weight the output layer
    torch.testing.assert_close(first_output(model, tiny_batch("bert")), expected, rtol=0, atol=1e-5)
    fresh = _classifier(family)  # and it saves as a deltatune checkpoint, head included
    DeltaBase.from_finetuned(delta.save_finetuned(tmp_path / "ours"), fresh)
    torch.testing.assert_close(first_output(fresh, tiny_batch("bert")), expected, rtol=0, atol=1e-5)

    other = _classifier(family)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    apart = from_peft(tmp_path / "adapter", other, attach=False, keep_backbone_apart=True)
    assert list(apart.backbone_apart) == heads and apart.unfrozen_backbone == []
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items()), "the backbone's head is its own"
    with pytest.raises(ValueError, match="pass attach=False with it"):
        from_peft(tmp_path / "adapter", _classifier(family), keep_backbone_apart=True)


def test_deltatune_merge_and_show_take_a_peft_adapter_and_its_head(tmp_path, capsys):
    from deltatune.cli import main

    torch.manual_seed(0)
    tf.BertModel(tiny_model("bert").config).save_pretrained(tmp_path / "backbone")  # no head: it comes with the adapter
    base = tf.BertForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=3)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    written = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in written.parameters():
            if p.requires_grad:  # LoRA and PEFT's copy of the 3-label head
                p.add_(torch.randn_like(p) * 0.1)
    expected = first_output(written.eval(), tiny_batch("bert"))
    written.save_pretrained(tmp_path / "adapter")
    command = ["merge", "--backbone", str(tmp_path / "backbone"), "--delta", str(tmp_path / "adapter")]
    assert main([*command, "--out", str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(first_output(merged, tiny_batch("bert")), expected, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["show", str(tmp_path / "backbone"), "--delta", str(tmp_path / "adapter"), "--width", "100"]) == 0
    assert "+ lora (LoraLayer, input->output)" in capsys.readouterr().out  # deltatune show takes it too

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**saved, "task_type": None}))
    assert main([*command, "--out", str(tmp_path / "unknown")]) == 2
    assert "names neither a transformers class (auto_mapping) nor a task type" in capsys.readouterr().err
    assert not (tmp_path / "unknown").exists()


def test_the_served_labels_of_a_peft_head_come_from_its_output_layer(tmp_path):
    """DistilBERT's head is pre_classifier (32 outputs) then classifier (2): the order is the model's, not the
    file's."""
    _peft_classifier("distilbert", tmp_path / "adapter")
    _tiny_distilbert().save_pretrained(tmp_path / "backbone")
    assert labels_of(tmp_path / "adapter", {}, str(tmp_path / "backbone")) == ["LABEL_0", "LABEL_1"]
    with pytest.raises(ValueError, match="name the backbone to order them"):
        labels_of(tmp_path / "adapter", {})


def _tied_llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                              tie_word_embeddings=True)).eval()


def test_export_refuses_backbone_parameters_that_modules_to_save_cannot_hold(tmp_path):
    cases = [
        (LoraModel(tiny_model("bert"), ["query", "classifier"]), ["deltas", "classifier"], "also adapted by LoRA"),
        (LoraModel(tiny_model("t5"), ["q"]), ["deltas", "shared"],  # PEFT keeps only input/output embeddings tied
         r"shared.weight is tied to \['encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', "
         r"'lm_head.weight'\]"),
    ]
    for delta, exclude, message in cases:
        delta.freeze_module(exclude=exclude)
        with pytest.raises(ValueError, match=message):
            delta.export_peft(tmp_path / "adapter")
    delta = LoraModel(tiny_model("bert"), ["query"])
    delta.unfrozen_backbone = ["classifier.bias"]  # as a checkpoint that saved only the bias loads
    with pytest.raises(ValueError, match=r"classifier is trained only in part \(\['classifier.bias'\]"):
        delta.export_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_mean_pooled_backbone_is_refused_both_ways(tmp_path):
    # PEFT's format records no pooling: its BERT classifier reads the pooler, whatever the delta was trained on
    delta = LoraModel(use_mean(tiny_model("bert")), ["query"]).freeze_module(exclude=["deltas", "classifier"])
    with pytest.raises(ValueError, match="pools by the tokens' mean .* save it with save_finetuned instead"):
        delta.export_peft(tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    _peft_classifier("bert", tmp_path / "adapter")
    model = use_mean(tiny_model("bert"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="imported onto a backbone whose classifier pools by the tokens' mean"):
        from_peft(tmp_path / "adapter", model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_trained_tied_embedding_crosses_over_with_peft_ensure_weight_tying(tmp_path):
    model = _tied_llama()
    delta = LoraModel(model, ["q_proj"]).freeze_module(exclude=["deltas", "embed_tokens"])
    _randomize(delta)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
    ours = first_output(model, tiny_batch("llama"))
    delta.export_peft(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens"] and config["ensure_weight_tying"] is True
    peft_model = peft.PeftModel.from_pretrained(_tied_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(first_output(peft_model, tiny_batch("llama")), ours, rtol=0, atol=1e-5)

    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    wrapped = peft.get_peft_model(_tied_llama(), config).eval()
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = first_output(wrapped, tiny_batch("llama"))
    wrapped.save_pretrained(tmp_path / "peft")  # lists model.embed_tokens, saves it and lm_head.weight
    back = _tied_llama()
    from_peft(tmp_path / "peft", back)
    torch.testing.assert_close(first_output(back, tiny_batch("llama")), expected, rtol=0, atol=1e-5)


def test_import_refuses_tensors_it_cannot_place_as_peft_did(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    wrapped = peft.get_peft_model(_tied_llama(), config)
    with torch.no_grad():
        wrapped.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)  # PEFT trains an untied copy
    wrapped.save_pretrained(tmp_path / "tied")
    model = _tied_llama()
    reference = first_output(model, tiny_batch("llama"))
    with pytest.raises(ValueError, match=r"ties to \['model.embed_tokens.weight'\]: writing it would change"):
        from_peft(tmp_path / "tied", model)
    assert torch.equal(first_output(model, tiny_batch("llama")), reference), "nothing was written"
    apart = from_peft(tmp_path / "tied", model, attach=False, keep_backbone_apart=True)
    assert list(apart.backbone_apart) == ["lm_head.weight"]
    assert torch.equal(first_output(model, tiny_batch("llama")), reference)

    _peft_classifier("bert", tmp_path / "unlisted")
    listed = tmp_path / "unlisted" / "adapter_config.json"
    listed.write_text(json.dumps({**json.loads(listed.read_text()), "modules_to_save": ["score"]}))
    with pytest.raises(ValueError, match=r"neither LoRA weights nor in modules_to_save=\['score'\]: "
                                         r"\['classifier.bias', 'classifier.weight'\]"):
        from_peft(tmp_path / "unlisted", tiny_model("bert"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_weights_is_refused(init, tmp_path):
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                       init_lora_weights=init))
    wrapped.save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    reference = first_output(model, tiny_batch("llama"))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' changed the base model's weights"):
        from_peft(tmp_path / "adapter", model)
    assert torch.equal(first_output(model, tiny_batch("llama")), reference), "nothing was attached"
