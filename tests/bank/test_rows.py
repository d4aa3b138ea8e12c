"""Mixed batches: every row of a routed batch equals that row run alone with its delta attached."""

from __future__ import annotations

import pytest
import torch

from deltatune import AutoDeltaModel, LoraModel
from deltatune.bank import DeltaBank

from conftest import FAMILIES, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # prompts and prefixes ride on the cache and mask APIs: both ends of the range

WEIGHT_TYPES = ["lora", "adapter", "bitfit", "ia3", "parallel_adapter", "compacter", "low_rank_adapter"]
ROWS = ["a", "b", None, "a"]
# Row b alone runs as a batch of one: matrix products of another shape round differently, within 1e-6 here.
TOLERANCE = 1e-5


def build_deltas(model, family: str, delta_type: str, names: str = "ab", **extra) -> dict:
    """Two deltas of ``delta_type`` with random (non-zero) weights; prompts and prefixes of different lengths."""
    spec = FAMILIES[family].positions[delta_type]
    options = spec if isinstance(spec, dict) else {"modified_modules": spec}
    deltas = {}
    for i, name in enumerate(names):
        sizes = {"soft_prompt": {"soft_token_num": 3 + i}, "prefix": {"prefix_token_num": 2 + i}}.get(delta_type, {})
        delta = AutoDeltaModel.from_config({"delta_type": delta_type, **options, **sizes, **extra}, model,
                                           attach=False, name=name)
        with torch.no_grad():
            for p in delta.delta_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        deltas[name] = delta
    return deltas


def own_outputs(logits: torch.Tensor, delta, width: int) -> torch.Tensor:
    """A row's outputs without the block's padding: a decoder's soft prompt block comes first, and a row's own
    prompt fills its last positions."""
    n = delta.config.soft_token_num if delta is not None and delta.delta_type == "soft_prompt" else 0
    return logits[:, width - n:]


def alone(model, deltas, name, inputs):
    if name is not None:
        deltas[name].attach()
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        if name is not None:
            deltas[name].detach()


def assert_rows_alone(model, deltas, rows, inputs) -> None:
    """The routed batch's row b equals row b run alone with delta ``rows[b]`` attached."""
    with torch.no_grad(), DeltaBank(model, deltas).route(rows):
        mixed = model(**inputs).logits
    for b, name in enumerate(rows):
        one = alone(model, deltas, name, {k: v[b:b + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[b:b + 1], one, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "t5", "bart"])
@pytest.mark.parametrize("delta_type", [*WEIGHT_TYPES, "soft_prompt", "prefix"])
def test_each_row_equals_the_row_alone_with_its_delta(family, delta_type):
    model = tiny_model(family)
    if delta_type == "prefix" and FAMILIES[family].seq2seq:
        deltas = build_deltas(model, family, delta_type)
        with pytest.raises(TypeError, match="without a row form: AttentionPrefix"):
            DeltaBank(model, deltas)
        return
    deltas = build_deltas(model, family, delta_type)
    inputs = {k: v for k, v in tiny_batch(family, batch=len(ROWS)).items() if k != "labels"}
    rows = ROWS
    if delta_type == "soft_prompt" and family == "bart":
        # BART takes no position_ids and counts a row's padding as positions: one prompt length, every row one.
        refusing = DeltaBank(model, deltas)
        with pytest.raises(ValueError, match="counts padding as positions"):
            with torch.no_grad(), refusing.route(rows):
                model(**inputs)
        refusing.close()
        deltas["b"] = build_deltas(model, family, delta_type, "c", soft_token_num=3)["c"]
        rows = ["a", "b", "b", "a"]
    bank = DeltaBank(model, deltas)
    if family == "roberta" and delta_type in ("soft_prompt", "prefix"):
        # RoBERTa numbers positions from its padding index: made-up positions would be wrong, so it needs them.
        with pytest.raises(ValueError, match="need explicit position_ids"):
            with torch.no_grad(), bank.route(rows):
                model(**inputs)
        inputs["position_ids"] = model.config.pad_token_id + 1 + torch.arange(7).expand(len(rows), -1)
    with torch.no_grad(), bank.route(rows):
        mixed = model(**inputs).logits
    decoder_prompt = delta_type == "soft_prompt" and family in ("gpt2", "llama")
    width = mixed.shape[1] - inputs["input_ids"].shape[1] if decoder_prompt else 0
    for b, name in enumerate(rows):
        one = alone(model, deltas, name, {k: v[b:b + 1] for k, v in inputs.items()})
        got = own_outputs(mixed[b:b + 1], deltas.get(name), width) if decoder_prompt else mixed[b:b + 1]
        torch.testing.assert_close(got, one, rtol=0, atol=TOLERANCE)
    length = inputs["input_ids"].shape[1]  # the deltas differ: the test could tell rows apart
    assert not torch.allclose(alone(model, deltas, "a", inputs)[:, -length:], alone(model, deltas, "b", inputs)[:, -length:])


@pytest.mark.parametrize("delta_type", ["lora", "ia3", "prefix", "soft_prompt", "adapter", "prefix+soft_prompt"])
def test_generation_of_a_mixed_left_padded_batch_equals_each_row_alone(delta_type):
    model = tiny_model("llama")
    if delta_type == "prefix+soft_prompt":  # a prefix added before a soft prompt still runs after it
        deltas = {"a": build_deltas(model, "llama", "prefix", "p")["p"],
                  "b": build_deltas(model, "llama", "soft_prompt", "s")["s"]}
    else:
        deltas = build_deltas(model, "llama", delta_type)
    ids = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generate() wants for decoders
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    bank = DeltaBank(model, deltas)
    with bank.route(ROWS):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **options)
    for b, name in enumerate(ROWS):
        if name is not None:
            deltas[name].attach()
        real = mask[b].bool()
        single = model.generate(input_ids=ids[b:b + 1, real], **options)
        if name is not None:
            deltas[name].detach()
        new = single[0, int(real.sum()):]  # it may stop early at the end-of-sequence token; the batch pads after
        assert torch.equal(mixed[b, ids.shape[1]:ids.shape[1] + len(new)], new), (b, name)


@pytest.mark.parametrize("delta_type", ["lora", "soft_prompt", "prefix"])
def test_beam_search_of_a_mixed_batch_equals_each_row_alone(delta_type):
    """generate(num_beams=k) runs each row as k consecutive rows: route(names, repeat=k) names them."""
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", delta_type)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(5))
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": 3,
               "num_return_sequences": 3}
    rows = ["a", None, "b"]
    bank = DeltaBank(model, deltas)
    with pytest.raises(ValueError, match=r"route\(names, repeat=k\)"), bank.route(rows):
        model.generate(input_ids=ids, **options)
    with bank.route(rows, repeat=3):
        mixed = model.generate(input_ids=ids, **options)
    for b, name in enumerate(rows):
        if name is not None:
            deltas[name].attach()
        single = model.generate(input_ids=ids[b:b + 1], **options)
        if name is not None:
            deltas[name].detach()
        assert torch.equal(mixed[3 * b:3 * b + 3, :single.shape[1]], single), (b, name)
    with pytest.raises(ValueError, match="repeat must be a positive integer"), bank.route(rows, repeat=0):
        pass


def test_dora_sliced_and_embedding_lora_rows():
    model = tiny_model("gpt2")
    deltas = {n: LoraModel(model, ["c_attn"], qkv_slices=["q", "v"], use_dora=True, attach=False, name=n)
              for n in "ab"}
    llama = tiny_model("llama")
    embedding = {n: LoraModel(llama, ["embed_tokens", "q_proj"], attach=False, name=n) for n in "ab"}
    for group, backbone, family in ((deltas, model, "gpt2"), (embedding, llama, "llama")):
        for delta in group.values():
            with torch.no_grad():
                for p in delta.delta_parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        inputs = {k: v for k, v in tiny_batch(family, batch=4).items() if k != "labels"}
        assert_rows_alone(backbone, group, ROWS, inputs)


def test_a_bank_mixes_delta_types_and_composes_with_an_attached_delta():
    model = tiny_model("llama")
    deltas = {**build_deltas(model, "llama", "lora"), **build_deltas(model, "llama", "prefix", "p"),
              **build_deltas(model, "llama", "ia3", "i")}
    shared = build_deltas(model, "llama", "bitfit", "s")["s"]
    shared.attach()  # every row gets it, with its own delta on top
    inputs = {k: v for k, v in tiny_batch("llama", batch=4).items() if k != "labels"}
    inputs["position_ids"] = torch.arange(7).expand(4, -1)
    assert_rows_alone(model, deltas, ["a", "p", "i", None], inputs)


def test_stacks_follow_changed_weights_and_dtype():
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", "lora")
    bank = DeltaBank(model, deltas)
    inputs = {"input_ids": torch.randint(3, 96, (2, 5))}
    with torch.no_grad(), bank.route(["a", "a"]):
        before = model(**inputs).logits
    with torch.no_grad():
        deltas["a"].delta_parameters()[0].mul_(2)  # an optimizer step, a loaded checkpoint...
        with bank.route(["a", "a"]):
            after = model(**inputs).logits
    torch.testing.assert_close(after[:1], alone(model, deltas, "a", {k: v[:1] for k, v in inputs.items()}),
                               rtol=0, atol=TOLERANCE)
    assert not torch.allclose(before, after)
    model.double()  # moves the stacks, not the detached deltas: a rebuild from them must follow the model
    with torch.no_grad():
        deltas["b"].delta_parameters()[0].mul_(2)
        with bank.route(["a", "b"]):
            assert model(**inputs).logits.dtype == torch.float64


def test_a_batch_narrower_than_the_banks_widest_prompt():
    """The block is as wide as the batch's widest prompt, not the bank's."""
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", "soft_prompt", "abc")  # 3, 4 and 5 soft tokens
    inputs = {"input_ids": torch.randint(3, 96, (3, 6))}
    rows = ["a", "b", None]
    with torch.no_grad(), DeltaBank(model, deltas).route(rows):
        mixed = model(**inputs).logits
    assert mixed.shape[1] == 4 + 6
    for b, name in enumerate(rows):
        one = alone(model, deltas, name, {"input_ids": inputs["input_ids"][b:b + 1]})
        torch.testing.assert_close(own_outputs(mixed[b:b + 1], deltas.get(name), 4), one, rtol=0, atol=TOLERANCE)


def test_outside_route_and_after_close_the_model_is_the_bare_model():
    model = tiny_model("llama")
    inputs = {"input_ids": torch.randint(3, 96, (2, 5))}
    with torch.no_grad():
        bare = model(**inputs).logits
    bank = DeltaBank(model, build_deltas(model, "llama", "lora"))
    with torch.no_grad(), bank.route(["a", "b"]):
        model(**inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)
    bank.close()
    assert not any(".deltas." in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)


def test_bad_routes_and_members_are_refused_clearly():
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", "lora")
    bank = DeltaBank(model, deltas)
    with pytest.raises(KeyError, match="no delta named 'c'; it holds: a, b"):
        with bank.route(["a", "c"]):
            pass
    with pytest.raises(TypeError, match="one delta name"):
        with bank.route("a"):
            pass
    with pytest.raises(ValueError, match="route\\(\\) named 3 rows, but a module of the model got a batch of 2"):
        with torch.no_grad(), bank.route(["a", "b", None]):
            model(input_ids=torch.randint(3, 96, (2, 5)))
    with pytest.raises(ValueError, match="already holds a delta named 'a'"):
        bank.add(deltas["b"], "a")
    deltas["a"].attach()
    with pytest.raises(RuntimeError, match="'a' is attached, so it would apply to every row"):
        with bank.route(["a", "b"]):
            pass
    deltas["a"].detach()
    model.train()
    with pytest.raises(RuntimeError, match="for inference: call model.eval"):
        with bank.route(["a", "b"]):
            pass
    model.eval()
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="another backbone"):
        bank.add(build_deltas(other, "llama", "lora")["a"], "c")
    paired = AutoDeltaModel.from_config({"delta_type": "parallel_adapter", "modified_modules": ["gate_proj"],
                                         "output_modules": ["down_proj"]}, model, attach=False)
    with pytest.raises(TypeError, match="without a row form: KeepInput, PairedAdapterLayer"):
        bank.add(paired, "pair")
    assert bank.names == ["a", "b"]


def test_opt_rows_with_prompts_of_different_lengths_need_positions_when_padded():
    model = tiny_model("opt")
    deltas = build_deltas(model, "opt", "prefix")
    inputs = {k: v for k, v in tiny_batch("opt", batch=4).items() if k != "labels"}
    bank = DeltaBank(model, deltas)
    with pytest.raises(ValueError, match="numbers positions by the mask"):
        with torch.no_grad(), bank.route(ROWS):
            model(**inputs)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    bank.close()
    assert_rows_alone(model, deltas, ROWS, inputs)


def test_stacks_follow_changes_to_the_deltas():
    """In-place updates (an optimizer step, a loaded checkpoint), replaced parameters, and writes through .data
    after refresh(): the next route() computes with the new weights."""
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", "lora")
    bank = DeltaBank(model, deltas)
    inputs = {k: v for k, v in tiny_batch("llama", batch=2).items() if k != "labels"}
    layer = next(iter(deltas["a"].deltas.values()))

    def check():
        with torch.no_grad(), bank.route(["a", "b"]):
            mixed = model(**inputs).logits
        for b, name in enumerate("ab"):
            one = alone(model, deltas, name, {k: v[b:b + 1] for k, v in inputs.items()})
            torch.testing.assert_close(mixed[b:b + 1], one, rtol=0, atol=TOLERANCE)

    check()
    with torch.no_grad():
        layer.lora_B.add_(1.0)  # as an optimizer step
    check()
    layer.lora_B = torch.nn.Parameter(torch.randn_like(layer.lora_B))
    check()
    layer.lora_B.data.copy_(torch.randn_like(layer.lora_B))  # no version counter sees this
    bank.refresh()
    check()


@pytest.mark.parametrize("delta_type", WEIGHT_TYPES)
def test_a_batch_of_one_delta_runs_through_that_deltas_own_modules(delta_type):
    """Every row naming one delta: each stack hands the batch to that delta's module (no gathered copies), with
    the same result; a member in training mode (its dropout would be live) falls back to the stacked weights."""
    model = tiny_model("llama")
    deltas = build_deltas(model, "llama", delta_type, **({"lora_dropout": 0.5} if delta_type == "lora" else {}))
    bank = DeltaBank(model, deltas)
    inputs = {k: v for k, v in tiny_batch("llama", batch=3).items() if k != "labels"}
    expected = alone(model, deltas, "b", inputs)
    for delta in deltas.values():
        for layer in delta.deltas.values():
            layer.eval()
    with torch.no_grad(), bank.route(["b"] * 3):
        stacks = [stack for _, _, stack, _ in bank._stacks if stack.index is not None]
        assert stacks and all(stack.alone is not None for stack in stacks)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=TOLERANCE)
    for delta in deltas.values():
        for layer in delta.deltas.values():
            layer.train()
    with torch.no_grad(), bank.route(["b"] * 3):
        assert all(stack.alone is None for stack in stacks)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reparameterised_prompts_route_as_the_prompts_they_compute(family):
    model = tiny_model(family)
    deltas = build_deltas(model, family, "soft_prompt", reparameterize=True, reparameterize_hidden=4)
    inputs = {k: v for k, v in tiny_batch(family, batch=len(ROWS)).items() if k != "labels"}
    with torch.no_grad(), DeltaBank(model, deltas).route(ROWS):
        mixed = model(**inputs).logits
    width = mixed.shape[1] - inputs["input_ids"].shape[1] if family == "llama" else 0
    for b, name in enumerate(ROWS):
        one = alone(model, deltas, name, {k: v[b:b + 1] for k, v in inputs.items()})
        got = own_outputs(mixed[b:b + 1], deltas.get(name), width) if width else mixed[b:b + 1]
        torch.testing.assert_close(got, one, rtol=0, atol=TOLERANCE)


def test_prompts_inserted_at_different_places_are_refused_in_one_bank():
    model = tiny_model("bert")
    deltas = {**build_deltas(model, "bert", "soft_prompt", "a"),
              **build_deltas(model, "bert", "soft_prompt", "b", insert_at=0)}
    with pytest.raises(ValueError, match=r"inserted at different places \(insert_at \[0, 1\]\) cannot share"):
        with DeltaBank(model, deltas).route(["a", "b"]):
            pass
