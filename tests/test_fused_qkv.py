"""Slices of fused q/k/v projections: the layout table agrees with each model's own attention, and LoRA, DoRA,
(IA)³ and BitFit adapt exactly the features of the slices they are given."""

import pytest
import torch
from torch import nn

from deltatune import AutoDeltaModel, BitFitModel, IA3Model, LoraModel
from deltatune.compat import Conv1D
from deltatune.structures import fused
from deltatune.structures.infer import looks_fused
from deltatune.zoo import ZooEntry, build, tiny_config

from conftest import first_output, tiny_batch, tiny_model

# Every attention class in the layout table, at a tiny size; config variants where one class has several layouts.
FUSED = {
    "gpt2": ("GPT2LMHeadModel", {}),
    "openai-gpt": ("OpenAIGPTLMHeadModel", {}),
    "mpt": ("MptForCausalLM", {}),
    "modernbert": ("ModernBertForSequenceClassification", {}),
    "phi3": ("Phi3ForCausalLM", {}),
    "phi4_multimodal": ("Phi4MultimodalForCausalLM", {}),
    "ergo": ("ErgoForCausalLM", {}),  # transformers 5.25
    "gpt_bigcode": ("GPTBigCodeForCausalLM", {"multi_query": True}),
    "gpt_bigcode-multihead": ("GPTBigCodeForCausalLM", {"multi_query": False}),
    "falcon-multiquery": ("FalconForCausalLM", {"multi_query": True, "new_decoder_architecture": False}),
    "falcon-multihead": ("FalconForCausalLM", {"multi_query": False, "new_decoder_architecture": False,
                                             "num_kv_heads": 4}),
    "falcon-new-architecture": ("FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "bloom": ("BloomForCausalLM", {}),
    "gpt_neox": ("GPTNeoXForCausalLM", {}),
    "gpt_neox_japanese": ("GPTNeoXJapaneseForCausalLM", {}),
    "persimmon": ("PersimmonForCausalLM", {}),
    "deberta": ("DebertaForSequenceClassification", {}),
    "minimax": ("MiniMaxForCausalLM", {}),
    "codegen": ("CodeGenForCausalLM", {}),
}


def _build(name: str) -> nn.Module:
    import transformers

    class_name, changes = FUSED[name]
    if not hasattr(transformers, class_name):  # at the oldest end of the supported range
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    config = tiny_config(name.split("-")[0] if name != "openai-gpt" else name)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    try:
        return getattr(transformers, class_name)(config).float().eval()
    except Exception as error:  # Phi-4 multimodal on 5.0: the tiny config lacks what its vision part reads
        pytest.skip(f"transformers {transformers.__version__} cannot build {class_name} tiny: {error}")


def _fused_projection(model: nn.Module) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and looks_fused(n))


def _edit(module: nn.Module, rows: torch.Tensor, how) -> None:
    """Apply ``how`` to the weight rows and bias entries of output features ``rows``."""
    with torch.no_grad():
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        weight[rows] = how(weight[rows])
        if module.bias is not None:
            module.bias[rows] = how(module.bias[rows])


def _logits(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 120, (2, 6), generator=generator)
    with torch.no_grad():
        output = model(input_ids=ids)
    return output.logits


def _zero(t):
    return torch.zeros_like(t)


def _noise(t):
    return t + torch.randn_like(t)


@pytest.mark.compat  # each model's own attention code decides the layout: checked at both ends of the range
@pytest.mark.parametrize("name", sorted(FUSED))
def test_the_layout_table_agrees_with_the_models_attention(name):
    """With k = 0 the scores ignore q, with q = 0 they ignore k, with v = 0 the output ignores q and k; and each
    slice alone does change the output.  A wrong split of the fused features fails one of these."""
    torch.manual_seed(0)
    model = _build(name)
    position, module = _fused_projection(model)
    rows = fused.qkv_rows(model, position, module.weight.shape[1 if isinstance(module, Conv1D) else 0])
    assert rows is not None and sorted(rows) == ["k", "q", "v"]
    assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(sum(len(r) for r in rows.values())))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def changed(zeroed: str | None, perturbed: list[str]) -> bool:
        model.load_state_dict(state)
        if zeroed:
            _edit(module, rows[zeroed], _zero)
        before = _logits(model)
        torch.manual_seed(1)
        for role in perturbed:
            _edit(module, rows[role], _noise)
        return not torch.allclose(_logits(model), before, atol=1e-6, rtol=0)

    assert all(changed(None, [role]) for role in "qkv")
    assert not changed("k", ["q"])
    assert not changed("q", ["k"])
    assert not changed("v", ["q", "k"])


def test_an_unknown_fused_layout_is_refused_by_name():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return self.qkv(x)

    model = nn.Sequential(Attention())
    with pytest.raises(TypeError, match=r"layout of Attention's fused projection is not known \(known: GPT2Attention"):
        LoraModel(model, ["qkv"], qkv_slices=["q", "v"], pseudo_input=torch.randn(1, 8))
    LoraModel(model, ["qkv"], lora_r=2, pseudo_input=torch.randn(1, 8))  # whole: fine


def test_gpt2_defaults_take_q_and_v_slices_like_unfused_attention():
    model = tiny_model("gpt2")
    embed = model.config.n_embd
    lora = LoraModel(model)
    assert lora.config.qkv_slices == ["q", "v"]
    assert lora.positions[0] == "transformer.h.0.attn.c_attn"
    # as LoRA on separate q and v projections: r·(in + out) each
    assert lora.num_delta_parameters() == model.config.n_layer * 2 * 8 * (embed + embed)
    assert "slices ['q', 'v'] of fused q/k/v" in lora.summary()
    lora.detach()
    assert IA3Model(model).config.qkv_slices == ["k", "v"]
    assert BitFitModel(model).config.qkv_slices is None  # q, k and v: the whole projection


def _c_attn_output(model, batch) -> torch.Tensor:
    seen = {}
    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    first_output(model, batch)
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("method,options,changed", [
    (LoraModel, {"qkv_slices": ["q", "v"]}, "qv"),
    (LoraModel, {"qkv_slices": ["q", "v"], "use_dora": True}, "qv"),
    (LoraModel, {"qkv_slices": ["k"]}, "k"),
    (IA3Model, {"qkv_slices": ["k", "v"]}, "kv"),
    (BitFitModel, {"qkv_slices": ["v"]}, "v"),
])
def test_slices_change_their_features_only_and_merge_save_and_load_exactly(method, options, changed, tmp_path):
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")
    embed = model.config.n_embd
    bare, bare_qkv = first_output(model, batch), _c_attn_output(model, batch)
    delta = method(model, ["attn.c_attn"], **options)
    assert torch.equal(first_output(model, batch), bare)  # unchanged at init
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    tuned, tuned_qkv = first_output(model, batch), _c_attn_output(model, batch)
    for index, role in enumerate("qkv"):
        part = slice(index * embed, (index + 1) * embed)
        same = torch.equal(tuned_qkv[..., part], bare_qkv[..., part])
        assert same == (role not in changed), role
    delta.merge(exact=True)
    assert torch.allclose(first_output(model, batch), tuned, atol=1e-5)
    delta.unmerge()
    assert torch.allclose(first_output(model, batch), tuned, atol=1e-6)
    delta.save_finetuned(tmp_path / "delta")
    fresh = tiny_model("gpt2")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", fresh)
    assert loaded.config.qkv_slices == options["qkv_slices"]
    assert torch.allclose(first_output(fresh, batch), tuned, atol=1e-6)
    delta.detach()
    assert torch.equal(first_output(model, batch), bare)


def test_slice_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"none of the modified modules is a fused q/k/v projection"):
        LoraModel(model, qkv_slices=["q", "v"])
    with pytest.raises(ValueError, match=r"qkv_slices must be distinct names among \['q', 'k', 'v'\], got "
                                         r"\['q', 'x'\]"):
        LoraModel(tiny_model("gpt2"), ["c_attn"], qkv_slices=["q", "x"])
    with pytest.raises(ValueError, match="qkv_slices must be distinct"):
        LoraModel(tiny_model("gpt2"), ["c_attn"], qkv_slices=[])


def test_gpt2_cross_attention_projects_k_and_v_only():
    config = build(ZooEntry("gpt2", "causal-lm", "GPT2LMHeadModel")).config
    config.add_cross_attention = True
    import transformers

    model = transformers.GPT2LMHeadModel(config).eval()
    memory = torch.randn(1, 3, config.n_embd)
    with pytest.raises(ValueError, match=r"crossattention.c_attn projects only \['k', 'v'\], not \['q'\]"):
        LoraModel(model, ["crossattention.c_attn"], qkv_slices=["q", "v"],
                  pseudo_input={"input_ids": torch.tensor([[1, 2]]), "encoder_hidden_states": memory})


def test_peft_export_refuses_slices(tmp_path):
    lora = LoraModel(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="PEFT's LoRA cannot express"):
        lora.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
