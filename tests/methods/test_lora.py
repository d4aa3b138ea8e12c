"""LoRA options: rsLoRA scaling, per-module ranks and alphas, and DoRA's weight decomposition."""

import pytest
import torch

from deltatune import DeltaBank, DeltaBase, LoraModel

from conftest import first_output, tiny_batch, tiny_model


def _randomize(delta):
    with torch.no_grad():
        for name, p in ((n, p) for d in delta.deltas.values() for n, p in d.named_parameters()):
            p.mul_(1.0 + 0.2 * torch.rand_like(p)) if name == "magnitude" else p.normal_(std=0.1)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = tiny_model("bert")
    plain = LoraModel(model, ["query"], lora_r=4, lora_alpha=8)
    rs = LoraModel(model, ["query"], lora_r=4, lora_alpha=8, use_rslora=True)
    assert next(iter(plain.deltas.values())).scaling == 2.0
    assert next(iter(rs.deltas.values())).scaling == 4.0


def test_rank_and_alpha_patterns_set_each_modules_own_and_survive_save_and_bank(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    patterns = {"rank_pattern": {r"[r]layers\.0\.self_attn\.q_proj": 2, "q_proj": 6},  # the first match wins
                "alpha_pattern": {"v_proj": 3.0}}
    delta = LoraModel(model, ["q_proj", "v_proj"], lora_r=4, lora_alpha=8, **patterns)
    assert {p.split("layers.")[1]: (d.r, d.scaling) for p, d in delta.deltas.items()} == {
        "0.self_attn.q_proj": (2, 4.0), "0.self_attn.v_proj": (4, 0.75),
        "1.self_attn.q_proj": (6, 8 / 6), "1.self_attn.v_proj": (4, 0.75)}
    _randomize(delta)
    tuned = first_output(model, batch)
    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    fresh = tiny_model("llama")
    DeltaBase.from_finetuned(tmp_path / "delta", fresh)
    assert torch.equal(first_output(fresh, batch), tuned)
    with torch.no_grad(), DeltaBank(model, [delta]).route([delta.name] * len(batch["input_ids"])):
        torch.testing.assert_close(first_output(model, batch), tuned, rtol=0, atol=1e-5)


@pytest.mark.parametrize("patterns, message", [
    ({"rank_pattern": {"k_proj": 2}}, r"rank_pattern entries \['k_proj'\] decide the value of no position"),
    ({"alpha_pattern": {"q_proj": 2.0, r"[r]layers\.0\.self_attn\.q_proj": 3.0}},  # shadowed by the first
     r"alpha_pattern entries \['\[r\]layers"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern values must be >= 1"),
    ({"alpha_pattern": {"q_proj": -1.0}}, "alpha_pattern values must be > 0"),
])
def test_a_pattern_entry_that_decides_nothing_or_is_out_of_range_is_refused(patterns, message):
    with pytest.raises(ValueError, match=message):
        LoraModel(tiny_model("llama"), ["q_proj", "v_proj"], **patterns)


@pytest.mark.parametrize("family,positions", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"]),
                                              ("bert", ["query", "value"])])
def test_dora_identity_training_merge_and_reload(family, positions, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    reference = first_output(model, batch)
    delta = LoraModel(model, positions, lora_r=4, use_dora=True).freeze_module()
    hosts = dict(model.named_modules())
    outs = sum(hosts[p].weight.shape[1 if family == "gpt2" else 0] for p in delta.positions)
    ins = sum(hosts[p].weight.shape[0 if family == "gpt2" else 1] for p in delta.positions)
    assert delta.num_delta_parameters() == 4 * (ins + outs) + outs
    # m = ‖W‖ at init, so the scale is exactly 1; only subtracting and re-adding the bias rounds
    torch.testing.assert_close(first_output(model, batch), reference, rtol=0, atol=1e-6)

    model.train()
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    _randomize(delta)  # a visibly non-trivial decomposition
    tuned = first_output(model, batch)
    assert not torch.allclose(tuned, reference, atol=1e-4)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta.merge()
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(first_output(model, batch), tuned, rtol=0, atol=1e-5)  # float32 round-off
    delta.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "DoRA unmerge restores exactly"

    delta.save_finetuned(tmp_path / "dora")
    fresh = tiny_model(family)
    loaded = DeltaBase.from_finetuned(tmp_path / "dora", fresh)
    assert loaded.config.use_dora
    assert torch.equal(first_output(fresh, batch), tuned)


def test_dora_refuses_embeddings():
    with pytest.raises(TypeError, match="use_dora=True"):
        LoraModel(tiny_model("llama"), ["embed_tokens"], use_dora=True)
