"""AutoDelta: default positions from the common names, type-free loading, the registry."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deltatune import AutoDeltaConfig, AutoDeltaModel, DeltaBase, DeltaConfig, Route, register
from deltatune.probe import Seen

from conftest import FAMILIES, first_output, tiny_batch, tiny_model

DEFAULTED = ["lora", "adapter", "low_rank_adapter", "compacter", "bitfit", "ia3", "parallel_adapter"]

EXPECTED_LORA = {  # the documented defaults, as resolved names of layer 0
    "bert": ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
    "gpt2": ["transformer.h.0.attn.c_attn"],  # q, k and v are one fused Conv1D: the whole projection
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "t5": ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("delta_type", DEFAULTED)
def test_defaults_attach_train_and_reload_without_the_type(family, delta_type, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    options = {"reduction_factor": 4} if delta_type in ("low_rank_adapter", "compacter") else {}
    delta = AutoDeltaModel.from_config({"delta_type": delta_type, **options}, backbone_model=model)
    assert delta.default_positions_of == model.config.model_type and delta.positions
    delta.freeze_module()
    model.train()
    model(**batch).loss.backward()
    torch.optim.SGD(delta.trainable_parameters(), lr=0.1).step()
    model.eval()
    tuned = first_output(model, batch)
    delta.save_finetuned(tmp_path / "delta")
    assert AutoDeltaConfig.from_finetuned(tmp_path / "delta").delta_type == delta_type
    fresh = tiny_model(family)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", fresh)
    assert loaded.positions == delta.positions
    assert torch.equal(first_output(fresh, batch), tuned)


@pytest.mark.parametrize("family", sorted(EXPECTED_LORA))
def test_default_lora_positions(family):
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora"}), tiny_model(family))
    layer0 = [p for p in delta.positions if ".0." in p][: len(EXPECTED_LORA[family])]
    assert layer0 == EXPECTED_LORA[family]
    assert "default positions for" in delta.summary()


def test_unknown_delta_type_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown delta_type 'lorra'; registered: .*lora"):
        AutoDeltaConfig.from_dict({"delta_type": "lorra"})


@dataclass
class ScaleConfig(DeltaConfig):
    init: float = 1.0


class Scale(nn.Module):
    def __init__(self, seen: Seen, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((seen.hidden_size,), init))

    def forward(self, h):
        return h * self.scale


@register
class ScaleModel(DeltaBase):
    """A method written outside the package: h <- h ⊙ s."""

    delta_type = "test_scale"
    config_class = ScaleConfig
    route = Route.OUTPUT_OUTPUT

    def build(self, position, module, seen):
        return Scale(seen, self.config.init)


def test_a_registered_outside_method_works_through_autodelta(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    delta = AutoDeltaModel.from_config({"delta_type": "test_scale", "modified_modules": ["value"], "init": 2.0}, model)
    out = first_output(model, batch)
    delta.save_finetuned(tmp_path / "scale")
    fresh = tiny_model("bert")
    assert isinstance(AutoDeltaModel.from_finetuned(tmp_path / "scale", fresh), ScaleModel)
    assert torch.equal(first_output(fresh, batch), out)
    with pytest.raises(ValueError, match="is deltatune's LoraModel"):
        register(type("Clash", (ScaleModel,), {"delta_type": "lora"}))


def _extra_family(name):
    import transformers as tf

    torch.manual_seed(0)
    if name == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)).eval()
    if name == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)).eval()
    return tf.ViTForImageClassification(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3)).eval()


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "vit"])
@pytest.mark.parametrize("delta_type", DEFAULTED)
def test_defaults_on_more_families(family, delta_type, tmp_path):
    model = _extra_family(family)
    if family == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    else:
        inputs = {"input_ids": torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1])
    options = {"reduction_factor": 4} if delta_type in ("low_rank_adapter", "compacter") else {}
    delta = AutoDeltaModel.from_config({"delta_type": delta_type, **options}, backbone_model=model).freeze_module()
    assert delta.default_positions_of == family
    model.train()
    model(**inputs, labels=labels).loss.backward()
    torch.optim.SGD(delta.trainable_parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        tuned = model(**inputs).logits
    delta.save_finetuned(tmp_path / "delta")
    fresh = _extra_family(family)
    AutoDeltaModel.from_finetuned(tmp_path / "delta", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, tuned)
