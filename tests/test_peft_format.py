"""PEFT interop for LoRA, both ways, with the real peft package (dev extra)."""

import pytest
import torch

from deltatune import LoraModel, from_peft

from conftest import first_output, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # run at both ends of the supported transformers range

peft = pytest.importorskip("peft")

CASES = [
    ("bert", ["query", "value"], {}),
    ("gpt2", ["c_attn", "c_fc"], {}),  # Conv1D: PEFT's fan_in_fan_out
    ("llama", ["q_proj", "v_proj", "embed_tokens"], {"use_rslora": True}),
    ("bert", ["query", "value"], {"use_dora": True}),
    ("gpt2", ["c_attn"], {"use_dora": True}),
]


def _randomize(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("family,targets,options", CASES)
def test_export_loads_in_peft_with_the_same_outputs(family, targets, options, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    delta = LoraModel(model, targets, lora_r=4, lora_alpha=8, **options)
    _randomize(delta)
    ours = first_output(model, batch)
    delta.export_peft(tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter").eval()
    # same formula, different kernels (PEFT scales after the product): equal up to float32 round-off
    torch.testing.assert_close(first_output(peft_model, batch), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,targets,options", CASES)
def test_import_from_peft_gives_the_same_outputs(family, targets, options, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options)
    peft_model = peft.get_peft_model(tiny_model(family), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    batch = tiny_batch(family)
    expected = first_output(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = tiny_model(family)
    delta = from_peft(tmp_path / "adapter", model)
    assert delta.config.lora_r == 4 and delta.config.use_dora == options.get("use_dora", False)
    assert len(delta.positions) == len([n for n, m in peft_model.named_modules() if n.endswith(tuple(targets))
                                        and hasattr(m, "lora_A")])
    torch.testing.assert_close(first_output(model, batch), expected, rtol=0, atol=1e-5)


def test_unsupported_peft_features_are_refused(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["query"], bias="lora_only")
    peft.get_peft_model(tiny_model("bert"), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="bias='lora_only'"):
        from_peft(tmp_path / "adapter", tiny_model("bert"))


def test_export_refuses_unfrozen_backbone_parameters(tmp_path):
    delta = LoraModel(tiny_model("bert"), ["query"]).freeze_module(exclude=["deltas", "classifier"])
    with pytest.raises(ValueError, match="modules_to_save"):
        delta.export_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_weights_is_refused(init, tmp_path):
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                       init_lora_weights=init))
    wrapped.save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    reference = first_output(model, tiny_batch("llama"))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' changed the base model's weights"):
        from_peft(tmp_path / "adapter", model)
    assert torch.equal(first_output(model, tiny_batch("llama")), reference), "nothing was attached"
