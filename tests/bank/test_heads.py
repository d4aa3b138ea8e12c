"""Deltas trained with their own classification heads, served together: each row gets its delta and its head."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from deltatune import DeltaBase, DeltaBank, LoraModel
from deltatune.bank.registry import DeltaRegistry

from conftest import VOCAB

TOLERANCE = 1e-5


def classifier(family: str, num_labels: int) -> tf.PreTrainedModel:
    """The same pretrained body (seed 0) with a fresh head of ``num_labels``, as a user's fine-tuning starts."""
    torch.manual_seed(0)
    if family == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_labels=3)
        model = tf.BertForSequenceClassification(config)
        targets = ["query", "value"]
    else:
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        model = tf.LlamaForSequenceClassification(config)
        targets = ["q_proj", "v_proj"]
    head = "classifier" if family == "bert" else "score"
    torch.manual_seed(num_labels)
    out = getattr(model, head)
    setattr(model, head, type(out)(out.in_features, num_labels, bias=out.bias is not None))
    model.config.num_labels = num_labels
    return model.eval(), targets, head


def trained(tmp_path, family: str, name: str, num_labels: int):
    """A LoRA trained with its head (random weights), saved; returns the folder."""
    model, targets, head = classifier(family, num_labels)
    delta = LoraModel(model, targets, name=name).freeze_module(exclude=["deltas", head])
    with torch.no_grad():
        for p in [*delta.delta_parameters(), *getattr(model, head).parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    return delta.save_finetuned(tmp_path / name)


def batch(family: str) -> dict:
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0  # right padding, as the engine pads
    ids[2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_each_row_is_classified_by_its_own_delta_and_head(tmp_path, family):
    folders = {"two": trained(tmp_path, family, "two", 2), "three": trained(tmp_path, family, "three", 3)}
    served, _, _ = classifier(family, 3)
    registry = DeltaRegistry(served)
    for name, folder in folders.items():
        registry.register(name, folder)
    registry.acquire(["two", "three"])
    head_before = {k: v.clone() for k, v in served.state_dict().items()}
    rows = ["two", "three", "three", "two"]
    inputs = batch(family)
    with torch.no_grad(), registry.bank.route(rows):
        mixed = served(**inputs).logits
    assert mixed.shape == (4, 3)
    assert all(torch.equal(v, served.state_dict()[k]) for k, v in head_before.items()), "the backbone is unchanged"
    for b, name in enumerate(rows):
        alone, _, _ = classifier(family, 2 if name == "two" else 3)
        DeltaBase.from_finetuned(folders[name], alone)
        row = {k: v[b:b + 1] for k, v in inputs.items()}
        with torch.no_grad():
            expected = alone(**row).logits[0]
        torch.testing.assert_close(mixed[b, :len(expected)], expected, atol=TOLERANCE, rtol=0)
        assert torch.all(mixed[b, len(expected):] == 0), "a narrower head's outputs are padded with zeros"


def test_a_delta_with_its_head_apart_refuses_to_attach_and_saves_what_it_holds(tmp_path):
    folder = trained(tmp_path, "bert", "two", 2)
    served, _, _ = classifier("bert", 3)
    delta = DeltaBase.from_finetuned(folder, served, attach=False, keep_backbone_apart=True)
    assert set(delta.backbone_apart) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(RuntimeError, match="apart from the backbone.*without keep_backbone_apart"):
        delta.attach()
    with pytest.raises(ValueError, match="pass attach=False"):
        DeltaBase.from_finetuned(folder, classifier("bert", 3)[0], keep_backbone_apart=True)
    again = delta.save_finetuned(tmp_path / "again")
    alone, _, _ = classifier("bert", 2)
    DeltaBase.from_finetuned(again, alone)  # the head it held apart, saved and loaded as trained
    reference, _, _ = classifier("bert", 2)
    DeltaBase.from_finetuned(folder, reference)
    torch.testing.assert_close(alone.classifier.weight, reference.classifier.weight, atol=0, rtol=0)


def test_heads_that_cannot_be_served_row_by_row_are_refused(tmp_path):
    model, _, _ = classifier("bert", 2)
    delta = LoraModel(model, ["query"], name="norm").freeze_module(exclude=["deltas", "bert.pooler", "LayerNorm"])
    folder = delta.save_finetuned(tmp_path / "norm")
    served, _, _ = classifier("bert", 2)
    apart = DeltaBase.from_finetuned(folder, served, attach=False, keep_backbone_apart=True)
    with pytest.raises(TypeError, match="LayerNorm.*nn.Linear heads only"):
        DeltaBank(served, {"norm": apart})


def test_a_delta_attached_to_a_served_head_is_refused(tmp_path):
    served, _, _ = classifier("bert", 2)
    registry = DeltaRegistry(served)
    registry.register("two", trained(tmp_path, "bert", "two", 2))
    registry.acquire(["two"])
    other = LoraModel(served, ["classifier"], name="other")
    with pytest.raises(RuntimeError, match="classifier serves the deltas' own heads.*other is attached"):
        with registry.bank.route(["two"] * 4):
            pass
    other.detach()
    with torch.no_grad(), registry.bank.route(["two"] * 4):
        assert served(**batch("bert")).logits.shape == (4, 2)
