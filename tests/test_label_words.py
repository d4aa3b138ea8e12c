"""Label words: the loss, its gradients and the predictions, computed at the scored positions only, equal those
computed the plain way, from every position's logits and transformers' own loss."""

import pytest
import torch
import transformers as tf

from deltatune import LoraModel, PrefixModel, SoftPromptModel
from deltatune.training.data import Task
from deltatune.kept_logits import logits_at
from deltatune.training.objectives import LabelWords

pytestmark = [pytest.mark.real, pytest.mark.compat]  # SmolLM2's tokenizer; the head hook meets transformers' models

ROWS = [("a film that never finds its footing", 0), ("warm, funny and wise", 1),
        ("win a free prize now by replying to this message today", 1), ("ok", 0)]
CONFIGS = {  # absolute, rotary and offset learned positions
    "llama": lambda v: tf.LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64),
    "gpt2": lambda v: tf.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "opt": lambda v: tf.OPTConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128),
}
DELTAS = {
    "none": lambda model: None,
    "lora": lambda model: LoraModel(model, ["q_proj", "v_proj"] if not isinstance(model, tf.GPT2LMHeadModel)
                                    else ["c_attn"]),
    "soft_prompt": lambda model: SoftPromptModel(model, soft_token_num=3),
    "prefix": lambda model: PrefixModel(model, prefix_token_num=2, embed_dim=16, mid_dim=16),
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, smollm2_path, minilm_path):
    """Tiny decoders with SmolLM2's tokenizer (which adds no BOS token); ``llama-bos`` with one that adds one (MiniLM's
    puts ``[CLS]`` first)."""
    folders = {}
    for family, config, tokenizer_path in [*((f, c, smollm2_path) for f, c in CONFIGS.items()),
                                           ("llama-bos", CONFIGS["llama"], minilm_path)]:
        tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_path)
        folders[family] = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(config(len(tokenizer))).save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


def _objective(folder, words: list[str], delta: str, max_length: int = 12) -> LabelWords:
    task = Task("t", ["a", "b"], [], [], [], label_words=words)
    objective = LabelWords(str(folder), task, max_length)
    torch.manual_seed(1)
    made = DELTAS[delta](objective.model)
    if made is not None:
        for parameter in made.delta_parameters():  # away from the identity, so every tensor has a gradient
            parameter.data.normal_(0, 0.5)
    return objective


def _plain_batch(objective: LabelWords, words: list[list[int]]):
    """The rows as before the head kept positions: right-padded, labels on the word, each prompt's last index."""
    texts = objective.tokenizer([t for t, _ in ROWS], add_special_tokens=False)["input_ids"]
    room = objective.max_length - len(objective.lead) - len(objective.suffix)
    prompts = [objective.lead + t[:max(1, room - len(w))] + objective.suffix for t, w in zip(texts, words)]
    width = max(len(p) + len(w) for p, w in zip(prompts, words))
    ids = torch.full((len(ROWS), width), objective.tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, w) in enumerate(zip(prompts, words)):
        ids[i, :len(p) + len(w)], mask[i, :len(p) + len(w)] = torch.tensor(p + w), 1
        labels[i, len(p):len(p) + len(w)] = torch.tensor(w, dtype=torch.long)
    return ids, mask, labels, torch.tensor([len(p) - 1 for p in prompts])


@pytest.mark.parametrize("family", [*sorted(CONFIGS), "llama-bos"])
@pytest.mark.parametrize("delta", sorted(DELTAS))
def test_the_loss_and_its_gradients_equal_transformers_loss_on_every_position(backbones, family, delta):
    # Words of one and of several tokens, so rows score different numbers of positions.
    objective = _objective(backbones[family], ["no", "spam message received"], delta)
    trainable = [p for n, p in objective.model.named_parameters() if "deltas" in n] or [
        objective.model.get_input_embeddings().weight]
    words = [objective.words[label] for _, label in ROWS]
    assert len({len(w) for w in words}) == 2  # in eval mode (as loaded): no dropout, so both ways see one model

    kept = objective.loss(ROWS)
    kept_grads = torch.autograd.grad(kept, trainable)
    ids, mask, labels, _ = _plain_batch(objective, words)
    plain = objective.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    plain_grads = torch.autograd.grad(plain, trainable)
    torch.testing.assert_close(kept, plain, rtol=1e-6, atol=1e-6)
    for k, p in zip(kept_grads, plain_grads):
        assert p.abs().sum() > 0
        torch.testing.assert_close(k, p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("delta", ["none", "soft_prompt", "prefix"])
def test_predictions_equal_those_read_from_every_position(backbones, family, delta):
    first_tokens = _objective(backbones[family], ["negative", "positive"], delta)
    whole_words = _objective(backbones[family], ["New York", "New Jersey"], delta)  # one first token: whole words
    assert first_tokens.first_tokens is not None and whole_words.first_tokens is None
    model = first_tokens.model
    ids, mask, _, ends = _plain_batch(first_tokens, [[]] * len(ROWS))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    at_ends = logits[torch.arange(len(ROWS)), ends + logits.shape[1] - ids.shape[1]]
    with torch.no_grad():  # the logits themselves, which two-way predictions could match by chance
        kept, _ = first_tokens._word_logits(model, ROWS, [[]] * len(ROWS))
    torch.testing.assert_close(kept[:, 0], at_ends, rtol=1e-5, atol=1e-5)
    assert torch.equal(first_tokens.predict(ROWS), at_ends[:, first_tokens.first_tokens].argmax(-1))

    scores = []
    for word in whole_words.words:
        ids, mask, labels, _ = _plain_batch(whole_words, [word] * len(ROWS))
        with torch.no_grad():
            logits = whole_words.model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:-1]
        picked = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * (labels[:, 1:] != -100)).sum(-1))
    expected = torch.stack(scores, -1)
    assert (expected[:, 0] - expected[:, 1]).abs().min() > 1e-4  # no near-tie for a rounding to flip
    assert torch.equal(whole_words.predict(ROWS), expected.argmax(-1))


def test_a_model_that_bypasses_its_head_module_gets_its_logits_picked_after(backbones):
    objective = _objective(backbones["llama"], ["negative", "positive"], "none")
    model = objective.model
    ids, mask, _, ends = _plain_batch(objective, [[]] * len(ROWS))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ROWS)), ends]
        model.get_output_embeddings = lambda: None
        got = logits_at(model, lambda: model(input_ids=ids, attention_mask=mask).logits, ends[:, None], ids.shape[1])
    assert torch.equal(got[:, 0], expected)


def test_a_head_given_its_states_by_name_keeps_the_same_positions(backbones):
    objective = _objective(backbones["llama"], ["negative", "positive"], "none")
    model, head = objective.model, objective.model.get_output_embeddings()
    ids, mask, _, ends = _plain_batch(objective, [[]] * len(ROWS))
    by_position = logits_at(model, lambda: model(input_ids=ids, attention_mask=mask).logits, ends[:, None], ids.shape[1])
    hidden = torch.randn(len(ROWS), ids.shape[1], 32)
    by_name = logits_at(model, lambda: head(input=hidden), ends[:, None], ids.shape[1])
    assert torch.equal(by_name, head(hidden[torch.arange(len(ROWS))[:, None], ends[:, None]]))
    assert by_position.shape == by_name.shape
    with pytest.raises(RuntimeError, match=r"called its output embeddings with \['extra', 'input'\]"):
        logits_at(model, lambda: head(input=hidden, extra=1), ends[:, None], ids.shape[1])


def test_a_head_called_twice_or_on_other_shapes_is_refused(backbones):
    objective = _objective(backbones["llama"], ["negative", "positive"], "none")
    model, head = objective.model, objective.model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="called its output embeddings 2 times in one forward"):
        logits_at(model, lambda: (model(input_ids=ids), head(torch.zeros(1, 3, 32)))[1], torch.tensor([[2]]), 3)
    with pytest.raises(RuntimeError, match=r"head read states of shape \(3, 32\); expected \(rows=1, at least 3 "
                                            r"positions, features\)"):
        logits_at(model, lambda: head(torch.zeros(3, 32)), torch.tensor([[2]]), 3)


def test_each_text_follows_the_tokens_its_tokenizer_puts_first(backbones, tmp_path):
    assert _objective(backbones["llama"], ["no", "yes"], "none").lead == []  # SmolLM2's tokenizer adds none
    objective = _objective(backbones["llama-bos"], ["no", "yes"], "none")
    assert objective.lead == [objective.tokenizer.cls_token_id]  # its [SEP] comes last, and is not kept
    ids, mask, columns, targets = objective.encode(ROWS, [objective.words[label] for _, label in ROWS])
    assert (ids[:, 0] == objective.tokenizer.cls_token_id).all() and ids.shape[1] <= objective.max_length
    assert objective.tokenizer.sep_token_id not in ids[mask.bool()].tolist()


def test_a_run_records_its_lead_tokens_and_eval_puts_them_back(backbones, tmp_path, capsys, monkeypatch):
    import json

    from deltatune.cli import main
    from deltatune.training import loop

    monkeypatch.setattr(loop, "finished", lambda out: None)  # keep last.pt, as a run killed at its end would

    out = tmp_path / "run"
    assert main(["train", "--backbone", str(backbones["llama-bos"]), "--task", "sms_spam", "--objective",
                 "label-words", "--max-train-examples", "16", "--max-eval-examples", "16", "--epochs", "1",
                 "--batch-size", "8", "--max-length", "24", "--out", str(out)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["lead_tokens"] == [101]  # MiniLM's [CLS]
    tested = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert main(["eval", "--delta", str(out), "--max-eval-examples", "16", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == tested
    # A run from before lead tokens were recorded put none before its texts; resumed, it goes on without them.
    options = ["--backbone", str(backbones["llama-bos"]), "--task", "sms_spam", "--objective", "label-words",
               "--max-train-examples", "16", "--max-eval-examples", "16", "--epochs", "1", "--batch-size", "8",
               "--max-length", "24", "--out", str(out)]
    (out / "training.json").write_text(json.dumps({k: v for k, v in record.items() if k != "lead_tokens"}))
    assert main(["train", *options, "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["lead_tokens"] == []

    from deltatune.cli.training_info import recorded_lead

    assert recorded_lead({}, 30522) == []  # a run from before lead tokens were recorded put none before its texts
    for bad in ("[101, 99999999]", '"101"', "[true]"):
        (out / "training.json").write_text(json.dumps({**record, "lead_tokens": json.loads(bad)}))
        assert main(["eval", "--delta", str(out), "--max-eval-examples", "4"]) == 2
        assert "training.json: lead_tokens must be a list of token ids below 30522" in capsys.readouterr().err
