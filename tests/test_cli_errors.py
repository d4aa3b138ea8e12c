"""The command line's rule for bad input, for every command: exit status 2, one line on stderr that names what was
wrong, and nothing written (no run folder that a rerun would then refuse)."""

import json
import shutil

import pytest
import transformers

from deltatune.cli import main
from deltatune.training.user_data import read_pairs

pytestmark = pytest.mark.real

DATA = "text,label\n" + "good movie,1\nbad movie,0\n" * 10


@pytest.fixture
def folder(tmp_path, minilm_path):
    (tmp_path / "d.csv").write_text(DATA)
    (tmp_path / "notok").mkdir()  # a model folder without its tokenizer
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_path / name, tmp_path / "notok" / name)
    (tmp_path / "t5").mkdir()  # an encoder-decoder: no causal LM class for label words
    transformers.T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "t5")
    run = tmp_path / "run"
    (run / "delta").mkdir(parents=True)
    (run / "training.json").write_text("{broken")
    return tmp_path


CASES = [
    (["train", "--max-length", "-5"], "--max-length must be at least 1, got -5"),
    (["train", "--max-length", "0"], "--max-length must be at least 1, got 0"),
    (["train", "--max-train-examples", "0"], "--max-train-examples must be at least 1, got 0"),
    (["train", "--max-eval-examples", "-1"], "--max-eval-examples must be at least 1, got -1"),
    (["train", "--delta-config", "{bad"], "--delta-config is not valid JSON"),
    (["train", "--delta-config", "[1]"], "expected KEY=VALUE, got '[1]'"),
    (["train", "--backbone", "nope-model"], "'nope-model' is not a model asset (minilm-l6, smollm2-135m), a local"),
    (["train", "--backbone", "{folder}/notok"], "notok holds no tokenizer"),
    (["train", "--delta", "soft_prompt", "--delta-config", "soft_token_num=100", "--max-length", "512"],
     "soft_prompt on BertForSequenceClassification cannot run inputs of --max-length 512 (ValueError: the soft "
     "prompt (100) and an input of 512 tokens need 612 positions, but the model embeds only 512"),
    (["train", "--objective", "label-words", "--backbone", "{folder}/t5"],
     "t5' as AutoModelForCausalLM: Unrecognized configuration class"),
    (["train", "--warmup-ratio", "2"], "warmup_ratio must be between 0 and 1, got 2.0"),
    (["train", "--data", "{folder}"], "is not a file"),
    (["eval", "--delta", "{folder}/run"], "run/training.json is not valid JSON"),
    (["eval", "--delta", "{folder}/run", "--max-eval-examples", "0"], "--max-eval-examples must be at least 1"),
    (["show", "nope-model"], "'nope-model' is not a model asset"),
    (["show", "minilm-l6", "--width", "0"], "--width must be at least 1, got 0"),
    (["show", "minilm-l6", "--json", "{folder}/no/such/folder/tree.json"], "its folder does not exist"),
    (["select", "minilm-l6", "--delta", "nope"], "unknown delta type 'nope'"),
    (["select", "minilm-l6", "--port", "99999"], "--port must be between 0 (a free one) and 65535, got 99999"),
]


@pytest.mark.parametrize("command,message", CASES, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(folder, capsys, command, message):
    command = [part.replace("{folder}", str(folder)) for part in command]
    if command[0] == "train":
        command += [] if "--data" in command else ["--data", str(folder / "d.csv")]
        command += ["--out", str(folder / "out")]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltatune {command[0]}: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (folder / "out").exists()


def test_numbers_written_differently_are_one_label(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y})
                                                for t, y in [("a", 1), ("b", "1.0"), ("c", 0), ("d", "x")]))
    assert [label for _, label in read_pairs(tmp_path / "d.jsonl", "text", "label")] == ["1", "1", "0", "x"]
