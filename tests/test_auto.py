"""AutoDelta: default positions from the common names, type-free loading, the registry."""

import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deltatune import AutoDeltaConfig, AutoDeltaModel, DeltaBase, DeltaConfig, Route, register
from deltatune.probe import Seen

from conftest import FAMILIES, first_output, tiny_batch, tiny_model

DEFAULTED = ["lora", "adapter", "low_rank_adapter", "compacter", "bitfit", "ia3", "parallel_adapter"]

# The documented defaults, as resolved names in the first block(s): LoRA (q, v) and adapters (after attention and FFN).
EXPECTED = {
    "bert": (["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
             ["bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output"]),
    "roberta": (["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"],
                ["roberta.encoder.layer.0.attention.output", "roberta.encoder.layer.0.output"]),
    # q, k and v are one fused Conv1D in GPT-2: LoRA takes the whole projection
    "gpt2": (["transformer.h.0.attn.c_attn"], ["transformer.h.0.attn", "transformer.h.0.mlp"]),
    "llama": (["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
              ["model.layers.0.self_attn", "model.layers.0.mlp"]),
    "opt": (["model.decoder.layers.0.self_attn.v_proj", "model.decoder.layers.0.self_attn.q_proj"],
            ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.fc2"]),
    "bart": (["model.encoder.layers.0.self_attn.v_proj", "model.encoder.layers.0.self_attn.q_proj",
              "model.decoder.layers.0.self_attn.v_proj", "model.decoder.layers.0.self_attn.q_proj",
              "model.decoder.layers.0.encoder_attn.v_proj", "model.decoder.layers.0.encoder_attn.q_proj"],
             ["model.encoder.layers.0.self_attn", "model.encoder.layers.0.fc2", "model.decoder.layers.0.self_attn",
              "model.decoder.layers.0.fc2"]),
    "t5": (["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v",
            "decoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.v",
            "decoder.block.0.layer.1.EncDecAttention.q", "decoder.block.0.layer.1.EncDecAttention.v"],
           ["encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.1.DenseReluDense",
            "decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.2.DenseReluDense"]),
    "distilbert": (["distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.attention.v_lin"],
                   ["distilbert.transformer.layer.0.attention", "distilbert.transformer.layer.0.ffn"]),
    "deberta-v2": (["deberta.encoder.layer.0.attention.self.query_proj",
                    "deberta.encoder.layer.0.attention.self.value_proj"],
                   ["deberta.encoder.layer.0.attention.output", "deberta.encoder.layer.0.output"]),
    "vit": (["vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"],
            ["vit.layers.0.attention", "vit.layers.0.mlp"]),
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


@pytest.mark.parametrize("family", sorted(EXPECTED))
@pytest.mark.parametrize("delta_type", ["lora", "adapter"])
def test_documented_default_positions(family, delta_type):
    model = tiny_model(family) if family in FAMILIES else _extra_family(family)
    pseudo = {"pixel_values": torch.zeros(1, 3, 16, 16)} if family == "vit" else None
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": delta_type}), model,
                                       pseudo_input=pseudo)
    # the outermost numbered block of each position is the first one
    first_blocks = [p for p in delta.positions if re.search(r"\.(layers?|h|block)\.(\d+)", p).group(2) == "0"]
    assert first_blocks == EXPECTED[family][delta_type == "adapter"]
    assert f"default positions for {family}" in delta.summary()


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


def test_an_outside_method_declares_its_default_positions_in_common_names():
    with pytest.raises(ValueError, match="ScaleModel needs modified_modules here .*'test_scale' has no default"):
        ScaleModel(tiny_model("bert"))
    defaulted = type("DefaultedScale", (ScaleModel,), {"delta_type": "test_scale_v",
                                                       "default_positions": {"modified_modules": ["v"]}})
    for family, value in (("bert", "attention.self.value"), ("llama", "self_attn.v_proj")):
        delta = defaulted(tiny_model(family))
        assert delta.positions and all(p.endswith(value) for p in delta.positions), delta.positions
    with pytest.raises(ValueError, match=r"need the option\(s\) \['qkv_slices'\], which ScaleConfig lacks"):
        defaulted(tiny_model("gpt2"))  # v is a slice of the fused c_attn there


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
    if name == "t5":  # encoder-decoder classifiers read the decoder at the input's end-of-sequence token
        return tf.T5ForSequenceClassification(tf.T5Config(
            vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, eos_token_id=1,
            decoder_start_token_id=0)).eval()
    if name == "bart":
        return tf.BartForSequenceClassification(tf.BartConfig(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            eos_token_id=2)).eval()
    return tf.ViTForImageClassification(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3)).eval()


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "vit", "t5", "bart"])
@pytest.mark.parametrize("delta_type", DEFAULTED)
def test_defaults_on_more_families(family, delta_type, tmp_path):
    model = _extra_family(family)
    if family == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    else:
        inputs = {"input_ids": torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))}
        inputs["input_ids"][:, -1] = model.config.eos_token_id or 2  # one per row, last, as tokenizers write it
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


class TinyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(self.to_q(x) @ self.to_k(x).transpose(-1, -2), dim=-1)
        return self.to_out(weights @ self.to_v(x))


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = TinyAttention(d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A transformer no family file knows."""

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_positions_are_inferred_for_an_unmapped_transformer(capsys):
    model = TinyTransformer()
    ids = torch.randint(0, 50, (2, 5))
    lora = AutoDeltaModel.from_config({"delta_type": "lora"}, model, pseudo_input=ids)
    assert lora.positions == [f"blocks.{i}.attn.to_{n}" for i in range(3) for n in ("q", "v")]
    lora.log()
    assert "inferred from the structure of TinyTransformer" in capsys.readouterr().out
    adapter = AutoDeltaModel.from_config({"delta_type": "adapter"}, model, pseudo_input=ids)
    assert adapter.positions == [f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "mlp")]
    bitfit = AutoDeltaModel.from_config({"delta_type": "bitfit"}, model, pseudo_input=ids)
    assert {p.rsplit(".", 1)[-1] for p in bitfit.positions} == {"to_q", "to_k", "to_v", "to_out", "0", "2",
                                                                 "norm1", "norm2"}
    parallel = AutoDeltaModel.from_config({"delta_type": "parallel_adapter"}, model, pseudo_input=ids)
    assert parallel.pairs == {f"blocks.{i}.mlp.2": f"blocks.{i}.mlp" for i in range(3)}


def test_a_plain_mlp_asks_for_modified_modules():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no stack of repeated blocks with an attention module .*pass modified_modules"):
        AutoDeltaModel.from_config({"delta_type": "lora"}, mlp, pseudo_input=torch.ones(1, 4))


class TinyImageText(nn.Module):
    """A vision tower of attention blocks, with or without language blocks that have no attention (state-space)."""

    def __init__(self, language_blocks: bool):
        super().__init__()
        self.vision_tower = TinyTransformer()
        if language_blocks:
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16)) for _ in range(2))

    def forward(self, ids):
        return self.vision_tower(ids)


def test_a_tower_is_the_default_only_where_there_is_nothing_else():
    ids = torch.randint(0, 50, (2, 5))
    alone = AutoDeltaModel.from_config({"delta_type": "lora"}, TinyImageText(False), pseudo_input=ids, attach=False)
    assert alone.positions == [f"vision_tower.blocks.{i}.attn.to_{n}" for i in range(3) for n in ("q", "v")]
    with pytest.raises(ValueError, match="no stack of repeated blocks with an attention module"):
        AutoDeltaModel.from_config({"delta_type": "lora"}, TinyImageText(True), pseudo_input=ids)
