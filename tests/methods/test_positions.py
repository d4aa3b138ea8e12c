"""Soft prompts and prefixes take positions of a learned position table: what does not fit is refused by name."""

import pytest

from deltatune import PrefixModel, SoftPromptModel

from conftest import tiny_batch, tiny_model

pytestmark = pytest.mark.compat

LENGTH = 7  # tiny_batch's input length
LIMITS = {"bert": 64, "roberta": 62, "gpt2": 64, "opt": 64, "bart": 64}  # RoBERTa: 64 rows, positions from 2
METHODS = {"soft_prompt": (SoftPromptModel, "soft_token_num"), "prefix": (PrefixModel, "prefix_token_num")}
SIZES = {"soft_prompt": {}, "prefix": {"embed_dim": 16, "mid_dim": 16}}  # within the tiny backbones' size


def _attach(family: str, method: str, n: int):
    model = tiny_model(family)
    cls, option = METHODS[method]
    cls(model, **{option: n}, **SIZES[method])
    return model, {k: v for k, v in tiny_batch(family).items() if k != "labels"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(LIMITS))
def test_the_last_position_that_fits_runs_and_one_more_is_refused_with_the_numbers(family, method):
    fitting = LIMITS[family] - LENGTH  # measured: the backbone itself fails (IndexError, size mismatch) one further
    model, inputs = _attach(family, method, fitting)
    model(**inputs)
    model, inputs = _attach(family, method, fitting + 1)
    what = (f"the soft prompt \\({fitting + 1}\\) and an input of {LENGTH} tokens" if method == "soft_prompt"
            else f"the prefix \\({fitting + 1}\\), earlier tokens \\(0\\) and this input \\({LENGTH}\\)")
    with pytest.raises(ValueError, match=f"{what} need {LIMITS[family] + 1} positions, but the model embeds only "
                                         f"{LIMITS[family]}: use a shorter prompt or prefix, or shorter inputs"):
        model(**inputs)


def test_a_prompt_or_prefix_longer_than_the_table_is_refused_when_built():
    with pytest.raises(ValueError, match=r"soft_token_num=100 and 1 token\(s\) of input need 101 positions, but the "
                                         "model embeds only 64"):
        SoftPromptModel(tiny_model("gpt2"), soft_token_num=100)
    with pytest.raises(ValueError, match=r"soft_token_num=63 and 2 token\(s\) of input need 65 positions"):
        SoftPromptModel(tiny_model("bert"), soft_token_num=63)  # encoders keep [CLS] before the prompt
    with pytest.raises(ValueError, match="prefix_token_num=64 and one token of input need 65 positions"):
        PrefixModel(tiny_model("opt"), prefix_token_num=64, **SIZES["prefix"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_generation_that_runs_out_of_positions_stops_with_the_count(method):
    model, inputs = _attach("gpt2", method, 50)  # 57 positions for the first call, one more per new token
    options = {"do_sample": False, "pad_token_id": 0}
    assert model.generate(**inputs, max_new_tokens=8, **options).shape[1] == LENGTH + 8  # the last token read: 64
    with pytest.raises(ValueError, match="need 65 positions, but the model embeds only 64"):
        model.generate(**inputs, max_new_tokens=9, **options)
