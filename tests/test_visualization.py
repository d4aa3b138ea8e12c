"""The folded module tree: snapshots on real MiniLM-L6 (bare, with LoRA + adapter), SmolLM2 in 40 lines, plain text
off a terminal, JSON and HTML exports."""

import io
import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf

from deltatune import AdapterModel, LoraModel
from deltatune.visualization import Visualization, build_tree

SNAPSHOTS = Path(__file__).parent / "snapshots"
pytestmark = pytest.mark.real


def _matches_snapshot(text: str, name: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"tree differs from {path} (UPDATE_SNAPSHOTS=1 rewrites it)"


def test_minilm_bare_tree_folds_layers_and_merges_same_shaped_siblings(minilm):
    text = Visualization(minilm).structure_graph(file=io.StringIO(), width=100)
    _matches_snapshot(text, "minilm_bare.txt")
    assert "layer.0-5 (BertLayer)" in text
    assert "query,key,value (Linear) weight:[384,384] bias:[384]" in text
    assert "backbone parameters: 22,713,986" in text


def test_minilm_tree_with_lora_and_adapter_marks_deltas_and_counts_them(minilm):
    LoraModel(minilm, ["query", "value"])
    adapter = AdapterModel(minilm).freeze_module()
    text = adapter.log(file=io.StringIO(), width=100)
    _matches_snapshot(text, "minilm_lora_adapter.txt")
    assert "query,value (Linear) weight:[384,384] bias:[384] = q,v" in text
    assert "+ lora (LoraLayer, input->output) lora_A:[8,384] lora_B:[384,8]" in text
    assert "key (Linear) weight:[384,384] bias:[384] = k" in text
    assert text.count("+ adapter (AdapterLayer, output->output)") == 2
    # LoRA 12 × 8 × 768 = 73,728; adapters 12 × (384·24 + 24 + 24·384 + 384) = 226,080; the LoRA is frozen now.
    assert "trainable: 226,080 (0.9824% of all)   delta: 299,808 (1.3199% of the backbone)" in text
    assert f"delta checkpoint: {299_808 * 4 / 1024 / 1024:,.1f} MiB of tensors" in text


def test_smollm2_tree_fits_in_40_lines(smollm2_path):
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    text = Visualization(model).structure_graph(common_names=True, file=io.StringIO(), width=100)
    assert len(text.splitlines()) <= 40
    assert "layers.0-29 (LlamaDecoderLayer)" in text
    assert "k_proj,v_proj (Linear) weight:[192,576] = k,v" in text


def test_a_terminal_gets_colours_and_a_pipe_plain_text(minilm, monkeypatch):
    LoraModel(minilm, ["query"])
    piped = io.StringIO()
    plain = Visualization(minilm).structure_graph(file=piped, width=100)
    assert "\x1b[" not in piped.getvalue() and piped.getvalue() == plain
    monkeypatch.setenv("FORCE_COLOR", "1")  # what rich treats as a terminal
    terminal = io.StringIO()
    assert Visualization(minilm).structure_graph(file=terminal, width=100) == plain  # the returned text stays plain
    coloured = terminal.getvalue()
    assert "\x1b[" in coloured and "\x1b[1;35m+ lora" in coloured  # deltas in bold magenta


def test_width_is_respected(minilm):
    narrow = Visualization(minilm).structure_graph(file=io.StringIO(), width=60)
    assert max(map(len, narrow.splitlines())) <= 60


def test_json_and_html_exports_hold_the_same_tree(minilm, tmp_path):
    LoraModel(minilm, ["query", "value"])
    visualization = Visualization(minilm)
    data = json.loads(visualization.save_json(tmp_path / "tree.json").read_text())
    assert data["totals"]["delta"] == 73_728
    nodes = {n["label"]: n for n in _walk(data["tree"])}
    assert nodes["query,value"]["common"] == ["q", "v"]
    assert [m["label"] for m in nodes["query,value"]["members"]] == ["query", "value"]
    assert len(nodes["query,value"]["names"]) == 12 and nodes["layer.0-5"]["kind"] == "BertLayer"
    html = visualization.save_html(tmp_path / "tree.html").read_text()
    assert html.startswith("<!doctype html>") and "http://" not in html and "https://" not in html  # no CDN
    assert "bert.encoder.layer.5.attention.self.value" in html


def _walk(node):
    yield node
    for child in node["children"]:
        yield from _walk(child)


def test_siblings_fold_by_structure_and_deltas_not_by_position():
    from torch import nn

    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4)))
    LoraModel(model, ["[r][12]"], lora_r=2, pseudo_input=torch.zeros(1, 4))
    root = build_tree(model)
    assert [(c.label, len(c.deltas)) for c in root.children] == [("0,3", 0), ("1-2", 1)]


def test_a_trainable_share_never_exceeds_all_parameters():
    from deltatune import LoraModel
    from deltatune.visualization.totals import Totals

    from conftest import tiny_model

    model = tiny_model("bert")
    LoraModel(model, ["query"])  # the backbone stays trainable, the delta adds to it
    totals = Totals.of(model)
    assert totals.trainable == totals.backbone + totals.delta
    assert f"({100:.4f}% of all)" in totals.lines()[1]
