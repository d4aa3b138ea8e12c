"""Mean pooling for sequence classifiers: what a checkpoint declares, the numbers, the refusals, the round trips."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy

import pytest
import torch
import transformers as tf

from deltatune import DeltaBase, LoraModel, PrefixModel, SoftPromptModel, pooling
from deltatune.cli import main, serve
from deltatune.cli.training_info import delta_and_options
from deltatune.loading import load_backbone

from conftest import tiny_model


def _declare(folder, **modes):
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": False, **{f"pooling_mode_{k}": v for k, v in modes.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


def test_what_a_checkpoint_declares(tmp_path, minilm_path):
    assert pooling.declared(minilm_path) == "mean"  # all-MiniLM-L6-v2 was trained on the tokens' mean
    assert pooling.declared(_declare(tmp_path / "a", cls_token=True)) == "cls"
    assert pooling.declared(_declare(tmp_path / "b", max_tokens=True)) == "max"
    assert pooling.declared(tmp_path) is None  # not a sentence-transformers folder
    assert pooling.resolve("auto", minilm_path) == "mean" and pooling.resolve("auto", tmp_path / "a") == "model"
    assert pooling.resolve("model", minilm_path) == "model"
    with pytest.raises(ValueError, match="unknown pooling 'cls'; choose auto, model, mean"):
        pooling.resolve("cls", tmp_path)


def test_the_head_reads_the_masked_mean_and_padding_does_not_count():
    torch.manual_seed(0)
    model = pooling.use_mean(tiny_model("bert").eval())
    assert pooling.of(model) == "mean" and not any("pooler" in name for name, _ in model.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        alone = model(input_ids=ids[:1, :4]).logits  # the first row without its padding, and no mask at all
    torch.testing.assert_close(logits, model.classifier(mean), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[:1], alone, rtol=0, atol=1e-5)


def test_a_deep_copy_and_concurrent_threads_each_read_their_own_mask():
    torch.manual_seed(0)
    model = pooling.use_mean(tiny_model("bert").eval())
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    masks = [torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6])]
    with torch.no_grad():
        expected = [model(input_ids=ids, attention_mask=m).logits for m in masks]
        copy = deepcopy(model)
        model(input_ids=ids, attention_mask=masks[0])  # the original's call must not feed the copy's pooler
        torch.testing.assert_close(copy(input_ids=ids, attention_mask=masks[1]).logits, expected[1], rtol=0, atol=0)

    # Both threads' masks are stored before either is read: each thread's forward waits at the last layer until the
    # other's has arrived there too, so a mask kept in one place for the model would be read by the wrong thread.
    meet = threading.Barrier(2, timeout=30)

    def wait_for_the_other(*_):
        meet.wait()

    model.bert.encoder.layer[-1].register_forward_hook(wait_for_the_other)

    def run(which: int) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=masks[which]).logits

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [0, 1]))
    for which, logits in enumerate(results):
        torch.testing.assert_close(logits, expected[which], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["roberta", "gpt2"])
def test_a_head_that_does_not_read_the_pooler_is_refused(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="mean pooling"):
        pooling.use_mean(model)
    assert pooling.of(model) == "model"


def test_a_head_that_ignores_the_pooler_is_refused_by_its_logits_and_the_model_is_left_as_it_was():
    class FirstToken(tf.BertForSequenceClassification):  # has a pooler, but classifies the first token's state
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            hidden = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state
            return tf.modeling_outputs.SequenceClassifierOutput(logits=self.classifier(hidden[:, 0]))

    torch.manual_seed(0)
    model = FirstToken(tiny_model("bert").config).eval()
    pooler = model.bert.pooler
    with pytest.raises(ValueError, match="does not read its base model's pooler. Use pooling 'model'"):
        pooling.use_mean(model)
    assert model.bert.pooler is pooler and not model.bert._forward_pre_hooks and pooling.of(model) == "model"


def test_a_soft_prompt_is_averaged_with_the_tokens():
    torch.manual_seed(0)
    model = pooling.use_mean(tiny_model("bert").eval())
    SoftPromptModel(model, soft_token_num=3)
    ids, mask = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        alone = model(input_ids=ids[:1, :3]).logits
    hidden = out.hidden_states[-1]  # 4 tokens + 3 prompt tokens after [CLS]
    extended = torch.cat([mask[:, :1], torch.ones(2, 3, dtype=mask.dtype), mask[:, 1:]], dim=1).unsqueeze(-1)
    mean = (hidden * extended).sum(1) / extended.sum(1)
    assert hidden.shape[1] == 7
    torch.testing.assert_close(out.logits, model.classifier(mean), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits[:1], alone, rtol=0, atol=1e-5)


def test_a_prefix_leaves_its_cached_positions_out_of_the_mean():
    torch.manual_seed(0)
    model = pooling.use_mean(tiny_model("bert").eval())
    PrefixModel(model, prefix_token_num=5, reparameterize=False)
    ids, mask = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        alone = model(input_ids=ids[:1, :3]).logits
    hidden = out.hidden_states[-1]
    mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert hidden.shape[1] == 4  # the prefix's 5 positions are keys and values only
    torch.testing.assert_close(out.logits, model.classifier(mean), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits[:1], alone, rtol=0, atol=1e-5)


def test_a_delta_trained_on_the_mean_is_refused_on_a_model_that_pools_cls(tmp_path):
    torch.manual_seed(0)
    mean = pooling.use_mean(tiny_model("bert").eval())
    LoraModel(mean, modified_modules=["query"]).save_finetuned(tmp_path / "d")
    plain = tiny_model("bert").eval()
    with pytest.raises(ValueError, match="pools by the tokens' mean; this one pools by the model's own head. "
                                         "Load the backbone with pooling='mean'"):
        DeltaBase.from_finetuned(tmp_path / "d", plain)
    DeltaBase.from_finetuned(tmp_path / "d", pooling.use_mean(tiny_model("bert").eval()))
    assert delta_and_options(tmp_path / "d") == (tmp_path / "d", {"pooling": "mean"})  # commands rebuild it so

    LoraModel(tiny_model("bert"), modified_modules=["query"]).save_finetuned(tmp_path / "plain")
    folders = {name: delta_and_options(tmp_path / name) for name in ("d", "plain")}
    with pytest.raises(ValueError, match=r"trained with different poolings \({'d': 'mean', 'plain': 'model'}\)"):
        serve._one_pooling(folders)


def test_load_backbone_applies_what_the_folder_declares(tmp_path):
    torch.manual_seed(0)
    tf.BertForSequenceClassification(tiny_model("bert").config).save_pretrained(tmp_path)
    _declare(tmp_path, mean_tokens=True)
    assert pooling.of(load_backbone(str(tmp_path), "AutoModelForSequenceClassification", pooling="auto")) == "mean"
    assert pooling.of(load_backbone(str(tmp_path), "AutoModelForSequenceClassification")) == "model"


def test_a_run_folder_records_its_pooling_and_a_bad_value_is_refused(tmp_path):
    (tmp_path / "delta").mkdir()
    record = {"backbone_options": {"num_labels": 2, "pooling": "mean"}}
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert delta_and_options(tmp_path)[1]["pooling"] == "mean"
    record["backbone_options"]["pooling"] = "max"
    (tmp_path / "training.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pooling 'max' is neither 'model' nor 'mean'"):
        delta_and_options(tmp_path)


@pytest.mark.real
def test_train_eval_and_merge_on_minilm_keep_the_mean(tmp_path, capsys):
    out = tmp_path / "run"
    short = ["--max-train-examples", "32", "--max-eval-examples", "32", "--epochs", "1", "--batch-size", "16"]
    assert main(["train", *short, "--out", str(out)]) == 0
    assert json.loads((out / "training.json").read_text())["backbone_options"]["pooling"] == "mean"
    assert json.loads((out / "delta" / "delta_config.json").read_text())["backbone"]["pooling"] == "mean"
    for delta in (out, out / "delta"):  # a run folder, and the plain delta folder in it
        assert main(["merge", "--backbone", "minilm-l6", "--delta", str(delta), "--out", str(tmp_path / "m")]) == 2
        assert "trained with mean pooling" in capsys.readouterr().err and not (tmp_path / "m").exists()
        assert main(["show", "minilm-l6", "--delta", str(delta), "--width", "100"]) == 0
    assert main(["train", *short, "--pooling", "model", "--out", str(tmp_path / "cls")]) == 0
    assert json.loads((tmp_path / "cls" / "training.json").read_text())["backbone_options"]["pooling"] == "model"
