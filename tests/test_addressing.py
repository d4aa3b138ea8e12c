import pytest
import torch

from deltatune import LoraModel
from deltatune.addressing import resolve_positions

from conftest import tiny_model


def test_tail_match_selects_full_names_in_model_order():
    model = tiny_model("bert")
    assert resolve_positions(model, ["value", "query"]) == [
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    ]


def test_tail_match_is_at_a_dot_boundary():
    model = tiny_model("bert")
    # "dense" must not match "...intermediate.dense_act" style names, and "output.dense" is a two-part tail.
    positions = resolve_positions(model, ["attention.output.dense"])
    assert positions == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_regex_is_anchored_at_the_end_and_at_a_dot():
    model = tiny_model("bert")
    assert resolve_positions(model, [r"[r]layer\.0\.attention\.self\.(query|key)"]) == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"]
    # "uery" is not at a dot boundary, so it matches nothing
    with pytest.raises(ValueError, match="matches no module"):
        resolve_positions(model, ["[r]uery"])


def test_exclude_modules():
    model = tiny_model("bert")
    assert resolve_positions(model, ["query"], ["[r]layer\\.0\\..*"]) == ["bert.encoder.layer.1.attention.self.query"]


def test_zero_match_lists_closest_names():
    model = tiny_model("bert")
    with pytest.raises(ValueError) as info:
        resolve_positions(model, ["querry"])
    assert "'querry'" in str(info.value) and "'query'" in str(info.value)


def test_bad_regex_is_a_clear_error():
    with pytest.raises(ValueError, match=r"invalid regular expression in module spec '\[r\]layer\(\.'"):
        resolve_positions(tiny_model("bert"), ["[r]layer(."])


def test_modules_inside_a_delta_are_not_addressable():
    model = tiny_model("bert")
    LoraModel(model, ["query"])
    with pytest.raises(ValueError, match="matches no module"):
        resolve_positions(model, ["lora"])
    assert all("deltas" not in p for p in resolve_positions(model, ["[r].*"]))


def test_modified_modules_is_required_where_no_family_mapping_exists():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"needs modified_modules here \(no common-name mapping for 'Sequential'"):
        LoraModel(model, pseudo_input=torch.ones(1, 4))


def test_excluding_everything_is_an_error():
    with pytest.raises(ValueError, match="removes every module"):
        resolve_positions(tiny_model("bert"), ["query"], ["query"])


def test_non_string_spec():
    with pytest.raises(TypeError, match="must be strings"):
        resolve_positions(tiny_model("bert"), [torch.nn.Linear])


def test_a_single_name_where_a_list_is_expected_is_that_name_not_its_characters():
    from deltatune import LoraModel

    from conftest import tiny_model

    model = tiny_model("bert")
    delta = LoraModel(model, "query", exclude_modules="layer.1.attention.self.query")
    assert delta.positions == ["bert.encoder.layer.0.attention.self.query"]
    delta.freeze_module(exclude="classifier")
    assert delta.unfrozen_backbone == ["classifier.weight", "classifier.bias"]
