"""The compatibility layer: feature detection, loud failures on a renamed cache, and room for prompts and prefixes."""

import re
from pathlib import Path

import pytest
import torch
import transformers as tf

from deltatune import PrefixModel, SoftPromptModel, compat

from conftest import tiny_batch, tiny_model

pytestmark = pytest.mark.compat


def test_the_cache_argument_is_found_by_signature_whatever_its_name():
    llama = tiny_model("llama")
    found = compat.cache_argument(llama.model)
    assert found in compat.CACHE_ARGUMENTS
    assert compat.cache_argument(llama.model.layers[0].self_attn) == found
    assert compat.cache_argument(llama.lm_head) is None


def test_a_cache_is_read_under_either_name_and_written_under_the_module_s():
    cache = compat.new_cache()
    for name in compat.CACHE_ARGUMENTS:
        assert compat.passed_cache({name: cache, "input_ids": None}) is cache
    kwargs = {"past_key_values": cache}
    compat.put_cache(kwargs, "cache", cache)
    assert kwargs == {"cache": cache}
    assert compat.passed_cache({"input_ids": torch.ones(1, 2)}) is None


def test_a_cache_under_an_unknown_name_or_of_a_legacy_type_is_an_error_naming_the_version():
    with pytest.raises(compat.CompatibilityError, match=r"arrived as 'kv_cache'.*\(transformers \d+\.\d+"):
        compat.passed_cache({"kv_cache": compat.new_cache()})
    with pytest.raises(compat.CompatibilityError, match="legacy tuple caches are not supported"):
        compat.passed_cache({"past_key_values": ((torch.ones(1), torch.ones(1)),)})


class RenamedCacheLlama(tf.LlamaForCausalLM):
    """A future release that renames the cache argument once more."""

    def forward(self, input_ids=None, attention_mask=None, kv_cache=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_methods_refuse_a_model_whose_cache_argument_they_cannot_find():
    torch.manual_seed(0)
    model = RenamedCacheLlama(tiny_model("llama").config)
    with pytest.raises(compat.CompatibilityError, match=r"cannot find the KV cache argument of RenamedCacheLlama\.forward"
                                                        r" \(looked for cache, past_key_values\) \(transformers "):
        SoftPromptModel(model, soft_token_num=2)
    with pytest.raises(compat.CompatibilityError, match=r"takes a KV cache argument \(cache or past_key_values\) or "
                                                        r"attention whose key and value projections"):
        PrefixModel(tiny_model("gpt2").transformer.h[0].mlp, pseudo_input=torch.ones(1, 2, 32))


def test_a_soft_prompted_call_with_a_cache_under_an_unknown_name_fails_instead_of_prompting_again():
    model = tiny_model("llama")
    SoftPromptModel(model, soft_token_num=2)
    with pytest.raises(compat.CompatibilityError, match="'kv_cache'"):
        model(input_ids=tiny_batch("llama")["input_ids"], kv_cache=compat.new_cache())


def test_masks_are_extended_with_visible_columns_in_both_conventions():
    boolean = torch.tensor([[[[True, False]]]])
    additive = torch.tensor([[[[0.0, -1e9]]]])
    assert compat.extend_mask(boolean, 2).tolist() == [[[[True, True, True, False]]]]
    assert compat.extend_mask(additive, 1).tolist() == [[[[0.0, 0.0, -1e9]]]]
    assert compat.extend_mask(None, 3) is None


def test_cache_slots_move_past_a_prefix_or_grow_with_an_inserted_prompt():
    kwargs = {"cache_position": torch.arange(4, 7)}
    compat.shift_cache_position(kwargs, 2)
    assert kwargs["cache_position"].tolist() == [6, 7, 8]
    kwargs = {"cache_position": torch.arange(3)}
    compat.shift_cache_position(kwargs, 2, extend=True)
    assert kwargs["cache_position"].tolist() == [0, 1, 2, 3, 4]
    kwargs = {}
    compat.shift_cache_position(kwargs, 2)
    assert kwargs == {}


@pytest.mark.parametrize("family, limit", [("bert", 64), ("roberta", 62), ("gpt2", 64), ("opt", 64), ("bart", 64),
                                           ("llama", None), ("t5", None)])
def test_position_limit_is_the_usable_part_of_a_learned_position_table(family, limit):
    # RoBERTa starts after its padding index (1), OPT and BART skip an offset of 2 rows; rotary / relative: no limit.
    assert compat.position_limit(tiny_model(family)) == limit


def test_activations_are_looked_up_by_name_with_a_helpful_error():
    assert isinstance(compat.activation("gelu_new"), torch.nn.Module)
    with pytest.raises(ValueError, match=r"unknown non_linearity 'gleu'; choose one of .*gelu_new"):
        compat.activation("gleu")


def test_only_the_compatibility_module_touches_transformers_internals():
    # Public model API (AutoModel..., TrainerCallback) is fine anywhere; submodules and cache names only in compat.py.
    package = Path(compat.__file__).parent
    internal = re.compile(r"from transformers\.\w|import transformers\.\w|[\"'](past_key_values|cache|cache_position)"
                          r"[\"']|(?<!`)\b(EncoderDecoderCache|DynamicCache|ACT2FN)\b(?!`)")
    offenders = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py")) if path != Path(
        compat.__file__) for number, line in enumerate(path.read_text().splitlines(), 1) if internal.search(line)]
    assert offenders == []


@pytest.mark.parametrize("method", [PrefixModel, SoftPromptModel])
def test_what_a_prompt_cannot_extend_is_refused_by_name(method):
    model = tiny_model("llama")
    method(model, **({"prefix_token_num": 2, "embed_dim": 8, "mid_dim": 8} if method is PrefixModel else
                     {"soft_token_num": 2}))
    batch = tiny_batch("llama")
    with pytest.raises(TypeError, match="need a growing KV cache .*, not StaticCache; drop cache_implementation"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2,
                       do_sample=False, pad_token_id=0, cache_implementation="static")
    with pytest.raises(TypeError, match=r"extend a 2-D attention_mask \(batch, tokens\); got one of shape \(2, 1, 7, 7\)"):
        model(input_ids=batch["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))


def test_an_unset_generation_setting_reads_as_the_default_generate_applies():
    assert compat.generation_setting(tf.GenerationConfig(), "top_k") == 50
    assert compat.generation_setting(tf.GenerationConfig(top_k=7), "top_k") == 7
