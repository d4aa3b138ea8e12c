"""Structure inference on models no family file maps: grouped-query attention, fused q/k/v, gated MLPs, MoE, plain
PyTorch modules; and the probe, which runs only for shapes no weight states."""

import pytest
import torch
from torch import nn

from deltatune import DELTA_TYPES, AutoDeltaModel, LoraModel, PrefixModel
from deltatune.structures import default_positions
from deltatune.zoo import ZooEntry, build


def tiny(model_type: str, class_name: str) -> nn.Module:
    return build(ZooEntry(model_type, "causal-lm", class_name))


def positions(delta_type: str, model: nn.Module) -> dict[str, list[str]]:
    return default_positions(DELTA_TYPES[delta_type].default_positions, model)[1]


def test_grouped_query_attention_projects_k_and_v_to_fewer_heads():
    model = tiny("qwen3", "Qwen3ForCausalLM")  # 4 query heads, 2 key/value heads
    assert tuple(model.model.layers[0].self_attn.k_proj.weight.shape) == (16, 32)
    lora = AutoDeltaModel.from_config({"delta_type": "lora"}, model)
    assert lora.positions == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert lora.deltas["model.layers.0.self_attn.v_proj"].lora_B.shape[0] == 16


def test_gated_mlp_is_gate_and_up_in_down_out():
    specs = positions("ia3", tiny("qwen3", "Qwen3ForCausalLM"))
    assert specs["feedforward_modules"] == [r"[r]model\.layers\.\d+\.mlp\.down_proj"]
    assert positions("parallel_adapter", tiny("qwen3", "Qwen3ForCausalLM")) == {
        "modified_modules": [r"[r]model\.layers\.\d+\.mlp"], "output_modules": [r"[r]model\.layers\.\d+\.mlp\.down_proj"]}


def test_a_fused_qkv_projection_is_recognised_and_lora_takes_it_whole():
    model = tiny("gpt_neox", "GPTNeoXForCausalLM")
    lora = AutoDeltaModel.from_config({"delta_type": "lora"}, model)
    assert lora.positions == ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.attention.query_key_value"]
    assert positions("bitfit", model)["modified_modules"][0].endswith(r"attention\.query_key_value")


def test_moe_with_fused_expert_tensors_is_adapted_around_the_moe_block_and_ia3_rescales_keys_and_values():
    model = tiny("mixtral", "MixtralForCausalLM")  # experts stored as 3-D tensors, not linear layers
    parallel = AutoDeltaModel.from_config({"delta_type": "parallel_adapter"}, model)
    assert parallel.positions == ["model.layers.0.mlp", "model.layers.1.mlp"] and not parallel.pairs
    adapter = AutoDeltaModel.from_config({"delta_type": "adapter"}, model)
    assert adapter.positions == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn", "mlp")]
    ia3 = AutoDeltaModel.from_config({"delta_type": "ia3"}, model)  # the experts' activations are no module's input
    assert ia3.positions == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
    assert ia3.config.feedforward_modules == []


def test_moe_with_shared_experts_adapts_the_shared_expert_linears():
    model = tiny("qwen2_moe", "Qwen2MoeForCausalLM")
    specs = positions("ia3", model)["feedforward_modules"]
    assert specs == [r"[r]model\.layers\.\d+\.mlp\.shared_expert\.down_proj"]
    # the router and the shared expert's gate are not feed-forward layers
    assert not any("gate" in s and "gate_proj" not in s for s in positions("bitfit", model)["modified_modules"])


def test_vision_towers_are_left_to_explicit_positions():
    model = build(ZooEntry("gemma3", "causal-lm", "Gemma3ForConditionalGeneration"))
    lora = AutoDeltaModel.from_config({"delta_type": "lora"}, model)
    assert lora.positions and all("language_model" in p for p in lora.positions)


class PlainClassifier(nn.Module):
    """nn.TransformerEncoder under a small classifier: no config, no dummy inputs."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.head(self.encoder(self.embed(input_ids)).mean(1))


def test_lora_on_linear_layers_needs_no_forward_pass():
    model = PlainClassifier()
    lora = LoraModel(model, ["linear1", "linear2"])
    assert model.calls == 0 and len(lora.positions) == 4
    with torch.no_grad():
        for p in lora.delta_parameters():
            p.add_(1.0)
    ids = torch.randint(0, 40, (3, 7))
    tuned = model(ids)
    lora.detach()
    assert not torch.allclose(tuned, model(ids))


def test_a_probe_on_a_plain_model_builds_token_ids_from_its_embedding():
    model = PlainClassifier()
    adapter = AutoDeltaModel.from_config({"delta_type": "adapter", "modified_modules": ["encoder.layers.0"]}, model)
    assert model.calls == 1 and adapter.deltas["encoder.layers.0"].down.in_features == 16


def test_a_plain_transformer_encoder_gets_defaults_by_wiring():
    model = PlainClassifier()
    # nn.MultiheadAttention keeps q, k, v in one in_proj_weight tensor, not a linear layer; its out_proj and the
    # feed-forward's linear1 / linear2 are found by shape.  But nn.MultiheadAttention reads out_proj's weight without
    # calling the module, so a delta there could never act: the defaults leave it out.
    assert positions("bitfit", model)["modified_modules"][0].endswith(r"self_attn\.out_proj")
    bitfit = AutoDeltaModel.from_config({"delta_type": "bitfit"}, model)
    assert {p.rsplit(".", 1)[-1] for p in bitfit.positions} == {"linear1", "linear2", "norm1", "norm2"}


def test_defaults_leave_out_modules_the_model_never_calls():
    from deltatune import BitFitModel

    model = tiny("bart", "BartForCausalLM")  # BART's decoder alone: its cross-attention never runs
    lora = LoraModel(model)
    assert lora.positions == [f"model.decoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("v_proj", "q_proj")]
    bitfit = BitFitModel(model)  # the cross-attention's projections and norm are left out, not a probe failure
    assert bitfit.positions and not [p for p in bitfit.positions if "encoder_attn" in p]
    with pytest.raises(RuntimeError, match="did not produce a tensor"):  # named explicitly: an error
        BitFitModel(model, ["encoder_attn_layer_norm"])


def test_prefix_on_latent_attention_has_keys_and_values_of_different_sizes():
    from deltatune import PrefixModel

    # Multi-head latent attention caches its compressed latent as "keys" and the rotary key part as "values"
    model = tiny("minicpm3", "MiniCPM3ForCausalLM")
    prefix = PrefixModel(model, prefix_token_num=3, reparameterize=False)
    keys, values = prefix.deltas[""].key_values(range(1))[0]
    assert tuple(keys.shape) == (1, 3, 16) and tuple(values.shape) == (1, 3, 4)  # kv_lora_rank, qk_rope_head_dim
    with torch.no_grad():
        prefix.deltas[""].prefix.mul_(50)
        ids = torch.tensor([[5, 9, 14, 3, 7]])
        whole = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=first.cache if hasattr(first, "cache") else first.past_key_values,
                     attention_mask=torch.ones(1, 5, dtype=torch.long)).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-4)
    prefix.detach()
    assert not torch.allclose(model(input_ids=ids).logits[:, -1], whole)


def test_hybrid_stacks_adapt_their_attention_and_feed_forward_layers_not_their_state_space_mixers():
    nemotron = tiny("nemotron_h", "NemotronHForCausalLM")  # one block class: Mamba, MoE, attention, MLP mixers
    assert LoraModel(nemotron).positions == ["model.layers.2.mixer.q_proj", "model.layers.2.mixer.v_proj"]
    feed_forward = positions("ia3", nemotron)["feedforward_modules"]
    assert not any("layers\\.0" in s or "out_proj" in s for s in feed_forward) and feed_forward
    olmo = tiny("olmo_hybrid", "OlmoHybridForCausalLM")  # two layer classes: linear and softmax attention
    assert LoraModel(olmo).positions == ["model.layers.0.linear_attn.q_proj", "model.layers.0.linear_attn.v_proj",
                                         "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    falcon = tiny("falcon_h1", "FalconH1ForCausalLM")  # attention and Mamba side by side in each block
    assert not any("mamba" in s for s in positions("ia3", falcon)["feedforward_modules"])


def test_experts_the_router_did_not_pick_on_the_probe_keep_their_deltas():
    from deltatune import IA3Model

    model = build(ZooEntry("switch_transformers", "seq2seq-lm", "SwitchTransformersForConditionalGeneration"))
    sparse = [n for n, _ in model.named_modules() if n.endswith("mlp.experts")]
    experts = [p for p in IA3Model(model).positions if ".experts." in p]
    assert sparse and len(experts) == 4 * len(sparse) and all(p.endswith(".wo") for p in experts)


def test_prefix_rows_are_refused_where_attention_does_more_along_the_sequence():
        # Nystromformer approximates attention with landmarks computed over the whole sequence
    with pytest.raises(TypeError, match=r"NystromformerForSequenceClassification's attention does more along the "
                                        r"sequence than attend .* PrefixModel refuses it"):
        PrefixModel(build(ZooEntry("nystromformer", "sequence-classification",
                                   "NystromformerForSequenceClassification")),
                    prefix_token_num=3, embed_dim=16, mid_dim=16)
    # MPNet adds a relative position bias computed for the input's length
    with pytest.raises(TypeError, match=r"adds prefix rows to MPNetForSequenceClassification's attention, which it "
                                        r"does not run with them \(RuntimeError"):
        PrefixModel(build(ZooEntry("mpnet", "sequence-classification", "MPNetForSequenceClassification")),
                    prefix_token_num=3, embed_dim=16, mid_dim=16)


def test_projection_names_are_read_through_wrappers_and_norm_named_attention_is_attention():
    moshi = tiny("moshi", "MoshiForCausalLM")  # q_proj.linear: a linear layer inside a wrapper module
    assert LoraModel(moshi).positions[:2] == ["model.layers.0.self_attn.q_proj.linear",
                                              "model.layers.0.self_attn.v_proj.linear"]
    prelayernorm = build(ZooEntry("roberta-prelayernorm", "sequence-classification",
                                  "RobertaPreLayerNormForSequenceClassification"))  # ...PreLayerNormAttention
    assert LoraModel(prelayernorm).positions[0].endswith("layer.0.attention.self.query")
