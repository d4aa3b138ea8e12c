"""The ``deltatune`` command line: show (tree of an asset, a folder, or a model with a saved delta), errors."""

import json
import re

import pytest

from deltatune import LoraModel
from deltatune.cli import main

pytestmark = pytest.mark.real


def test_show_prints_the_folded_tree_of_an_asset(capsys):
    assert main(["show", "minilm-l6", "--width", "100"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "BertModel"
    assert "layer.0-5 (BertLayer)" in out and "query,key,value (Linear) weight:[384,384] bias:[384] = q,k,v" in out


def test_show_loads_a_saved_delta_onto_a_local_folder_and_exports(minilm_path, tmp_path, capsys):
    import transformers as tf

    LoraModel(tf.AutoModel.from_pretrained(minilm_path), ["query", "value"]).save_finetuned(tmp_path / "lora")
    assert main(["show", str(minilm_path), "--delta", str(tmp_path / "lora"), "--width", "100",
                 "--json", str(tmp_path / "tree.json"), "--html", str(tmp_path / "tree.html")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("LoraModel 'lora' (input->output) on 12 modules of BertModel, attached")
    assert "+ lora (LoraLayer, input->output) lora_A:[8,384] lora_B:[384,8]" in out
    assert json.loads((tmp_path / "tree.json").read_text())["totals"]["delta"] == 73_728
    assert (tmp_path / "tree.html").read_text().startswith("<!doctype html>")


def test_bad_model_and_bad_delta_folder_are_clear_errors(tmp_path, capsys):
    assert main(["show", "no-such-model"]) == 2
    assert "'no-such-model' is not a model asset (minilm-l6, smollm2-135m), a local folder" in capsys.readouterr().err
    assert main(["show", "minilm-l6", "--delta", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a delta checkpoint: delta_config.json is missing" in capsys.readouterr().err


def test_select_without_a_submission_times_out_cleanly(capsys):
    assert main(["select", "minilm-l6", "--timeout", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout holds only the result: `deltatune select MODEL > mods.json`
    assert "Choose the modules to modify at http://127.0.0.1:" in captured.err
    assert "no selection was submitted within 1 s; the selector has stopped" in captured.err


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # past the usage lines
    for option, default in [("--epochs EPOCHS", "1"), ("--lr LR", "the method's, 1e-3; 3e-2 for soft_prompt"), ("--batch-size BATCH_SIZE", "32"),
                            ("--seed SEED", "0"), ("--out OUT", "out/train"), ("--text-column TEXT_COLUMN", "text")]:
        assert re.search(re.escape(option) + r" [^()]*\(default: " + re.escape(default) + r"\)", text), option


@pytest.mark.parametrize("options,message", [
    ({"num_labels": 2, "trust_remote_code": True}, r"sets backbone options \['trust_remote_code'\]; a run folder may "
                                                   r"record only \['id2label', 'label2id', 'num_labels', 'pooling'\]"),
    ({"num_labels": "2"}, r"backbone options \['num_labels'\] have the wrong type"),
    ([], "backbone_options must be a mapping"),
])
def test_a_run_folder_cannot_set_options_that_load_code(minilm_path, tmp_path, capsys, options, message,
                                                       monkeypatch):
    import transformers as tf

    from deltatune.cli import show

    run = tmp_path / "run"
    LoraModel(tf.AutoModel.from_pretrained(minilm_path), ["query"]).save_finetuned(run / "delta")
    (run / "training.json").write_text(json.dumps({"backbone_options": options}))
    loaded = []
    monkeypatch.setattr(show, "load_backbone", lambda *a, **k: loaded.append(k))
    assert main(["show", str(minilm_path), "--delta", str(run)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert loaded == []  # refused before any model is loaded


def test_a_run_folder_with_broken_json_names_the_file(tmp_path, capsys):
    (tmp_path / "delta").mkdir()
    (tmp_path / "training.json").write_text("{not json")
    assert main(["show", "minilm-l6", "--delta", str(tmp_path)]) == 2
    assert f"{tmp_path / 'training.json'} is not valid JSON" in capsys.readouterr().err
