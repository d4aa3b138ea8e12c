"""LoRA on fused MoE expert weights: the model runs as with W_e + (α/r) B_e A_e written into its parameters, under
every experts implementation, trains, merges, saves, detaches bit-exactly, and is refused where it cannot act."""

import copy
import json
import threading

import pytest
import torch

from deltatune import DeltaBank, DeltaBase, LoraModel, from_peft, zoo
from deltatune.methods.lora_experts import LoraExpertsLayer
from deltatune.probe import pseudo_inputs

pytestmark = pytest.mark.compat  # transformers' experts modules and their implementations: both ends of the range

FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]  # gpt-oss stores its expert weights transposed, with biases


def _model(model_type: str):
    entry = next(e for e in zoo.entries() if e.model_type == model_type and e.task == "causal-lm")
    model = zoo.build(entry)
    return model, pseudo_inputs(model)


def _lora(model, **options) -> LoraModel:
    delta = LoraModel(model, ["experts"], lora_r=2, lora_alpha=4, allow_larger_than_backbone=True, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return delta


def _written_in(model, delta: LoraModel):
    """A copy of the bare model with each expert's update added to its parameters by hand."""
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    with torch.no_grad():
        for position, layer in delta.deltas.items():
            for name in layer.names:
                a, b = layer.lora_A[name], layer.lora_B[name]
                update = torch.einsum("eor,eri->eoi", b, a) * layer.scaling  # (E, out, in)
                getattr(modules[position], name).add_(update.transpose(1, 2) if layer.transposed else update)
    return copied


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_expert_runs_with_its_updated_weight_in_every_implementation(model_type, tmp_path):
    model, inputs = _model(model_type)
    bare_copy = copy.deepcopy(model)
    bare = model(**inputs).logits
    delta = _lora(model)
    assert {tuple(layer.names) for layer in delta.deltas.values()} == {("gate_up_proj", "down_proj")}
    expected = _written_in(bare_copy, delta)(**inputs).logits
    for implementation in ["eager", "batched_mm", "grouped_mm"]:
        model.config._experts_implementation = implementation
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-5)
    model.config._experts_implementation = "eager"
    tuned = model(**inputs).logits
    assert not any(name in vars(m) for m in model.modules() for name in ("gate_up_proj", "down_proj")), \
        "the updated weights are gone after the call"

    delta.save_finetuned(tmp_path / "delta")
    fresh, _ = _model(model_type)
    DeltaBase.from_finetuned(tmp_path / "delta", fresh, allow_larger_than_backbone=True)
    assert torch.equal(fresh(**inputs).logits, tuned)
    delta.merge(exact=True)
    torch.testing.assert_close(model(**inputs).logits, tuned, rtol=0, atol=1e-5)
    delta.unmerge()
    delta.detach()
    assert torch.equal(model(**inputs).logits, bare)


def test_the_update_trains_and_the_experts_stay_frozen():
    model, inputs = _model("mixtral")
    delta = _lora(model).freeze_module(exclude=["deltas"])
    model.train()
    model(**inputs).logits.square().mean().backward()
    layer = next(iter(delta.deltas.values()))
    assert all(layer.lora_A[n].grad.abs().sum() > 0 and layer.lora_B[n].grad.abs().sum() > 0 for n in layer.names)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_a_call_that_raises_leaves_no_updated_weight_behind():
    model, inputs = _model("mixtral")
    delta = _lora(model)
    experts = model.get_submodule(delta.positions[0])

    def fail(module, args):
        raise RuntimeError("failed inside the experts' call")

    handle = experts.register_forward_pre_hook(fail)  # runs after the slot's: the updated weights are in place
    with pytest.raises(RuntimeError, match="failed inside"):
        model(**inputs)
    handle.remove()
    assert not any("gate_up_proj" in vars(m) for m in model.modules())
    other = threading.Thread(target=lambda: model(**inputs))  # the slot's lock was released: no deadlock
    other.start()
    other.join(timeout=60)
    assert not other.is_alive()
    expected = model(**inputs).logits
    assert torch.equal(copy.deepcopy(model)(**inputs).logits, expected)  # a copy routes through its own deltas


def test_a_second_thread_waits_while_one_runs_inside_the_experts():
    """Held inside its experts call (weights swapped in), the first thread's call must not see a second thread's
    call end and take the updated weights away: the second waits at the experts for the first."""
    model, inputs = _model("mixtral")
    delta = _lora(model)
    expected = model(**inputs).logits
    inside, release = threading.Event(), threading.Event()
    holder = {}

    def hold(module, args):
        if threading.current_thread() is holder.get("thread"):
            inside.set()
            assert release.wait(60)

    model.get_submodule(delta.positions[0]).register_forward_pre_hook(hold)
    results = {}
    first = threading.Thread(target=lambda: results.update(first=model(**inputs).logits))
    second = threading.Thread(target=lambda: results.update(second=model(**inputs).logits))
    holder["thread"] = first
    first.start()
    assert inside.wait(60)
    second.start()
    second.join(1.0)
    waited = second.is_alive()  # without the slot's lock, it runs through and removes the first one's weights
    release.set()
    first.join(60)
    second.join(60)
    assert waited and torch.equal(results["first"], expected) and torch.equal(results["second"], expected)


def test_experts_without_a_known_layout_and_unsupported_options_are_refused(tmp_path):
    model, _ = _model("llama4_text")  # Llama4TextExperts does not say whether its weights are transposed
    with pytest.raises(TypeError, match=r"experts \(Llama4TextExperts\): its expert weights \['gate_up_proj', "
                                        r"'down_proj'\] do not say their layout"):
        LoraModel(model, ["experts"], allow_larger_than_backbone=True)
    model, _ = _model("mixtral")
    for options in ({"use_dora": True}, {"lora_dropout": 0.1}):
        with pytest.raises(ValueError, match="takes neither use_dora, lora_dropout nor qkv_slices"):
            LoraModel(model, ["experts"], allow_larger_than_backbone=True, **options)
    delta = _lora(model, rank_pattern={"experts": 1})
    with pytest.raises(ValueError, match="gives fused expert weights a rank or alpha of their own"):
        delta.export_peft(tmp_path / "adapter")  # PEFT would match the pattern against parameter names
    assert not (tmp_path / "adapter").exists()
    delta.detach()
    with pytest.raises(TypeError, match="without a row form: LoraExpertsLayer"):
        DeltaBank(model).add(delta)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_peft_target_parameters_cross_both_ways(model_type, tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = _model(model_type)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    written = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, parameter in written.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    expected = written(**inputs).logits
    written.save_pretrained(tmp_path / "theirs")

    ours, _ = _model(model_type)
    delta = from_peft(tmp_path / "theirs", ours)
    torch.testing.assert_close(ours(**inputs).logits, expected, rtol=0, atol=1e-5)
    assert sum(isinstance(layer, LoraExpertsLayer) for layer in delta.deltas.values()) == 2  # one per MoE layer

    only = peft.LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"])
    peft.get_peft_model(_model(model_type)[0], only).save_pretrained(tmp_path / "part")
    with pytest.raises(ValueError, match="deltatune adapts every expert weight of a module"):
        from_peft(tmp_path / "part", _model(model_type)[0])
    saved = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps({**saved, "alpha_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match="rank_pattern/alpha_pattern with target_parameters"):
        from_peft(tmp_path / "theirs", _model(model_type)[0])
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(saved))

    try:  # transformers 5.0's weight conversion breaks PEFT's own loading of MoE adapters (peft 0.21.2)
        peft.PeftModel.from_pretrained(_model(model_type)[0], tmp_path / "theirs")
    except TypeError as error:
        pytest.skip(f"PEFT cannot load its own target_parameters adapter here: {error}")
    delta.export_peft(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_model(model_type)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=1e-5)

