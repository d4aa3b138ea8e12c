"""Soft prompts: where they go, how they start, generation with a KV cache, errors."""

import pytest
import torch

from deltatune import DeltaBase, SoftPromptModel

from conftest import full_pass_logits, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # run at both ends of the supported transformers range


def _left_padded(family):
    batch = tiny_batch(family)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(1)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_cached_generation_equals_uncached_and_survives_a_round_trip(family, tmp_path):
    model = tiny_model(family)
    inputs = _left_padded(family)
    delta = SoftPromptModel(model, soft_token_num=5)
    with torch.no_grad():
        delta.delta_parameters()[0].normal_()
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(**inputs, **options, output_logits=True, return_dict_in_generate=True)
    cached = generated.sequences
    # Without a cache every step re-reads the prompt: equal tokens show the cached steps' mask and positions are right.
    assert torch.equal(cached, model.generate(**inputs, **options, use_cache=False))
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 6)
    # The ground truth: one forward pass over the generated sequence, which inserts the prompt once, yields the
    # logits of every cached step (a prompt inserted again at a cached step would not).
    torch.testing.assert_close(torch.stack(generated.logits, 1), full_pass_logits(model, inputs, cached)[:, -7:-1],
                               rtol=0, atol=1e-5)  # float round-off of a different summation order

    delta.save_finetuned(tmp_path / "prompt")
    fresh = tiny_model(family)
    DeltaBase.from_finetuned(tmp_path / "prompt", fresh)
    assert torch.equal(fresh.generate(**inputs, **options), cached)


def test_encoders_keep_cls_first_and_decoders_put_the_prompt_first():
    seen = {}
    for family in ("bert", "llama"):
        model = tiny_model(family)
        delta = SoftPromptModel(model, soft_token_num=3)
        embeddings = model.get_input_embeddings()
        base = model.bert if family == "bert" else model.model
        handle = base.register_forward_pre_hook(
            lambda m, a, k, f=family: seen.__setitem__(f, k["inputs_embeds"]), with_kwargs=True)
        ids = tiny_batch(family)["input_ids"]
        model(input_ids=ids)
        handle.remove()
        prompt = delta.delta_parameters()[0]
        if family == "bert":
            assert torch.equal(seen[family][:, 0], embeddings(ids)[:, 0])
            assert torch.equal(seen[family][0, 1:4], prompt)
        else:
            assert torch.equal(seen[family][0, :3], prompt)


def test_token_init_uses_vocabulary_embeddings_and_labels_ignore_the_prompt():
    model = tiny_model("llama")
    delta = SoftPromptModel(model, soft_token_num=6)
    vocabulary = model.get_input_embeddings().weight
    prompt = delta.delta_parameters()[0]
    assert all(any(torch.equal(row, v) for v in vocabulary) for row in prompt)
    random_init = SoftPromptModel(tiny_model("llama"), soft_token_num=6, token_init=False, init_range=0.25)
    assert random_init.delta_parameters()[0].abs().max() <= 0.25
    batch = tiny_batch("llama")
    loss = model(**batch).loss  # would fail on a length mismatch if labels were not extended with -100
    assert torch.isfinite(loss)


def test_errors():
    with pytest.raises(ValueError, match="takes no modified_modules"):
        SoftPromptModel(tiny_model("bert"), ["query"])
    with pytest.raises(TypeError, match="supports transformers models, not Sequential"):
        SoftPromptModel(torch.nn.Sequential(torch.nn.Linear(2, 2)), pseudo_input=torch.ones(1, 2))
    with pytest.raises(ValueError, match="soft_token_num must be >= 1 and <= 1048576, got 0"):
        SoftPromptModel(tiny_model("bert"), soft_token_num=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoders_prompt_the_encoder_in_forward_and_generate(family, tmp_path):
    model = tiny_model(family)
    # Plain greedy decoding of exactly 5 tokens, so one forward pass can check every one of them.
    model.generation_config.eos_token_id = model.generation_config.forced_bos_token_id = None
    model.generation_config.forced_eos_token_id = None
    inputs = _left_padded(family)
    delta = SoftPromptModel(model, soft_token_num=4)
    assert delta.positions == ["", "encoder" if family == "t5" else "model.encoder"]
    with torch.no_grad():
        delta.delta_parameters()[0].normal_()
    options = {"max_new_tokens": 5, "do_sample": False}
    generated = model.generate(**inputs, **options)
    assert torch.equal(generated, model.generate(**inputs, **options, use_cache=False))
    # The ground truth: one forward pass (which runs the encoder itself) picks the same tokens.
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=generated[:, :-1]).logits
    assert torch.equal(logits.argmax(-1)[:, -5:], generated[:, -5:])
    encoder_out = model.get_encoder()(**inputs).last_hidden_state
    assert encoder_out.shape[1] == inputs["input_ids"].shape[1] + 4

    delta.save_finetuned(tmp_path / "prompt")
    fresh = tiny_model(family)
    fresh.generation_config = model.generation_config
    DeltaBase.from_finetuned(tmp_path / "prompt", fresh)
    assert torch.equal(fresh.generate(**inputs, **options), generated)


def test_models_with_several_end_tokens_take_a_prompt():
    from deltatune.zoo import ZooEntry, build

    model = build(ZooEntry("glm", "causal-lm", "GlmForCausalLM"))
    assert isinstance(model.config.eos_token_id, list)  # the special-token check reads every id of the list
    assert SoftPromptModel(model, soft_token_num=2).num_delta_parameters() == 2 * model.config.hidden_size


def test_a_model_without_any_cache_takes_the_prompt_on_every_generation_step():
    from deltatune.zoo import ZooEntry, build

    model = build(ZooEntry("openai-gpt", "causal-lm", "OpenAIGPTLMHeadModel"))  # re-reads the whole sequence
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        bare = model(input_ids=ids).logits[:, -1]
    prompt = SoftPromptModel(model, soft_token_num=3)
    with torch.no_grad():
        prompt.delta_parameters()[0].mul_(20)
        assert not torch.allclose(model(input_ids=ids).logits[:, -1], bare)  # the prompt is read
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        by_hand = ids
        for _ in range(4):  # greedy, one full forward pass per token
            by_hand = torch.cat([by_hand, model(input_ids=by_hand).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, by_hand)
    with pytest.raises(Exception, match="cannot find the KV cache argument of RwkvForCausalLM"):
        SoftPromptModel(build(ZooEntry("rwkv", "causal-lm", "RwkvForCausalLM")))  # keeps a state between steps


def test_a_soft_prompt_after_a_prefix_is_still_read():
    """A prefix fills the KV cache; a soft prompt that ran after it took the call for a later generation step and
    left its prompt out, silently.  Cache-filling rewrites now run last, whatever the creation order."""
    from deltatune import PrefixModel

    model = tiny_model("llama")
    PrefixModel(model, prefix_token_num=2, reparameterize=False)
    prompt = SoftPromptModel(model, soft_token_num=3)
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        with_prompt = model(input_ids=ids).logits
        prompt.detach()
        without = model(input_ids=ids).logits
    assert with_prompt.shape[1] == 6 + 3 and without.shape[1] == 6
    assert not torch.allclose(with_prompt[:, 3:], without)


def _embeds_seen(model, family, **inputs):
    """What the base model receives as inputs_embeds (the prompt inserted)."""
    seen = {}
    base = model.bert if family == "bert" else model.model
    handle = base.register_forward_pre_hook(lambda m, a, k: seen.update(e=k["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    handle.remove()
    return seen["e"]


def test_insert_at_places_the_prompt_in_an_encoder_and_is_refused_in_a_decoder():
    model = tiny_model("bert")
    ids = tiny_batch("bert")["input_ids"]
    delta = SoftPromptModel(model, soft_token_num=3, insert_at=0)
    embeds = _embeds_seen(model, "bert", input_ids=ids)
    assert torch.equal(embeds[0, :3], delta.delta_parameters()[0])
    assert torch.equal(embeds[:, 3], model.get_input_embeddings()(ids)[:, 0])  # [CLS] after the prompt
    delta.detach()
    SoftPromptModel(model, soft_token_num=3, insert_at=2)
    assert torch.equal(_embeds_seen(model, "bert", input_ids=ids)[:, :2], model.get_input_embeddings()(ids)[:, :2])
    with pytest.raises(ValueError, match="goes after token 2 \\(insert_at\\), and the input has only 1"):
        model(input_ids=ids[:, :1])
    with pytest.raises(ValueError, match="insert_at=1: LlamaForCausalLM generates after its input, so the prompt "
                                         "goes first"):
        SoftPromptModel(tiny_model("llama"), soft_token_num=3, insert_at=1)


def test_the_reparameterised_prompt_starts_as_the_plain_one_and_trains_through_its_mlp(tmp_path):
    ids = tiny_batch("bert")["input_ids"]
    torch.manual_seed(0)
    plain_model = tiny_model("bert")
    torch.manual_seed(1)
    SoftPromptModel(plain_model, soft_token_num=4)
    torch.manual_seed(0)
    model = tiny_model("bert")
    torch.manual_seed(1)
    delta = SoftPromptModel(model, soft_token_num=4, reparameterize=True, reparameterize_hidden=8)
    plain_model.eval(), model.eval()
    assert torch.equal(model(input_ids=ids).logits, plain_model(input_ids=ids).logits)  # up is zero at init
    d = model.get_input_embeddings().embedding_dim
    assert delta.num_delta_parameters() == 4 * d + 2 * 8 * d + 8 + d
    delta.freeze_module()
    model(input_ids=ids).logits.square().sum().backward()
    layer = next(m for m in model.modules() if hasattr(m, "reparameterization") and m.reparameterization)
    assert layer.reparameterization.up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = model(input_ids=ids).logits
    delta.save_finetuned(tmp_path / "prompt")
    fresh = tiny_model("bert")
    DeltaBase.from_finetuned(tmp_path / "prompt", fresh).backbone_model.eval()
    assert torch.equal(fresh(input_ids=ids).logits, expected)
