"""Prefix tuning: parameter count, generation with a KV cache, padding, encoder-decoders, folding, errors."""

import sys

import pytest
import torch

from deltatune import DeltaBase, PrefixModel

from conftest import first_output, full_pass_logits, tiny_batch, tiny_model

pytestmark = pytest.mark.compat  # run at both ends of the supported transformers range

SMALL = {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16}


def test_parameter_count_follows_the_formula():
    model = tiny_model("llama")  # 2 layers, 2 KV heads (GQA) of size 8
    width = 2 * 2 * 2 * 8
    assert PrefixModel(model, **SMALL).num_delta_parameters() == 3 * 16 + 16 * 16 + 16 + 16 * width + width
    assert PrefixModel(model, **SMALL, reparameterize=False, attach=False).num_delta_parameters() == 3 * width


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_generation_with_a_cache_equals_without_and_survives_fold_and_reload(family, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(1)}  # left-padded
    delta = PrefixModel(model, **SMALL)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(**inputs, **options, output_logits=True, return_dict_in_generate=True)
    cached = generated.sequences
    assert torch.equal(cached, model.generate(**inputs, **options, use_cache=False))
    # The ground truth: one forward pass over the whole generated sequence, with the positions generate() gives a
    # left-padded row, yields the logits of every cached step.
    torch.testing.assert_close(torch.stack(generated.logits, 1), full_pass_logits(model, inputs, cached)[:, -7:-1],
                               rtol=0, atol=1e-5)  # float round-off of a different summation order (seen: 1e-7)

    outputs = first_output(model, batch)
    delta.fold()
    assert not delta.config.reparameterize and delta.num_delta_parameters() == 3 * sum(
        t.shape[-1] for t in delta.delta_parameters())
    torch.testing.assert_close(first_output(model, batch), outputs, rtol=0, atol=1e-6)  # the MLP ran once, same math
    delta.save_finetuned(tmp_path / "prefix")
    fresh = tiny_model(family)
    DeltaBase.from_finetuned(tmp_path / "prefix", fresh)
    assert torch.equal(fresh.generate(**inputs, **options), model.generate(**inputs, **options))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoders_hook_the_bare_model_and_respect_padding(family):
    model = tiny_model(family)
    batch = tiny_batch(family)
    delta = PrefixModel(model, **SMALL)
    assert delta.positions == [family]  # BertForSequenceClassification.forward takes no cache; BertModel does
    tuned = first_output(model, batch)
    assert not torch.allclose(tuned, first_output(tiny_model(family), batch))
    padded_row_changed = dict(batch, input_ids=batch["input_ids"].clone())
    padded_row_changed["input_ids"][0, -2:] = 7  # row 0's last two tokens are masked out
    torch.testing.assert_close(first_output(model, padded_row_changed)[0], tuned[0], rtol=0, atol=1e-6)


def _distilbert():
    from deltatune.zoo import ZooEntry, build

    return build(ZooEntry("distilbert", "sequence-classification", "DistilBertForSequenceClassification"))


def test_prefix_rows_on_attention_without_a_cache_equal_the_prefix_attention_written_out(tmp_path):
    model = _distilbert()  # DistilBERT's attention takes no KV cache
    batch = tiny_batch("bert")
    bare = first_output(model, batch)
    delta = PrefixModel(model, **SMALL)
    layers = model.distilbert.transformer.layer
    assert delta.positions[:3] == ["distilbert.transformer.layer.0.attention",
                                   "distilbert.transformer.layer.0.attention.k_lin",
                                   "distilbert.transformer.layer.0.attention.v_lin"]
    attention = layers[0].attention
    seen = {}

    def record(module, args, kwargs, output):  # the layer's input and its attention's output
        seen.setdefault("x", kwargs.get("hidden_states", args[0] if args else None))

    handles = [layers[0].register_forward_hook(record, with_kwargs=True),
               attention.register_forward_hook(lambda m, a, k, o: seen.update(out=o[0]), with_kwargs=True)]
    tuned = first_output(model, batch)
    for handle in handles:
        handle.remove()
    keys, values = delta.deltas[delta.positions[0]].table.key_values(range(1))[0]  # (1, n, 32) each
    x, heads = seen["x"], attention.n_heads
    split = lambda t: t.view(t.shape[0], -1, heads, 32 // heads).transpose(1, 2)  # noqa: E731
    linear = lambda layer, t: torch.nn.functional.linear(t, layer.weight, layer.bias)  # noqa: E731 (unhooked)
    with torch.no_grad():
        q = split(linear(attention.q_lin, x)) / (32 // heads) ** 0.5
        k = split(torch.cat([keys.expand(2, -1, -1), linear(attention.k_lin, x)], dim=1))
        v = split(torch.cat([values.expand(2, -1, -1), linear(attention.v_lin, x)], dim=1))
        visible = torch.cat([torch.ones(2, 3), batch["attention_mask"]], dim=1).bool()
        scores = q @ k.transpose(2, 3) + torch.where(visible, 0.0, float("-inf"))[:, None, None, :]
        by_hand = attention.out_lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(seen["out"], by_hand)
    assert not torch.allclose(tuned, bare)
    padded_row_changed = dict(batch, input_ids=batch["input_ids"].clone())
    padded_row_changed["input_ids"][0, -2:] = 7  # row 0's last two tokens are masked out
    torch.testing.assert_close(first_output(model, padded_row_changed)[0], tuned[0], rtol=0, atol=1e-6)
    delta.fold()
    torch.testing.assert_close(first_output(model, batch), tuned)
    delta.save_finetuned(tmp_path / "prefix")
    fresh = _distilbert()
    DeltaBase.from_finetuned(tmp_path / "prefix", fresh)
    torch.testing.assert_close(first_output(fresh, batch), tuned)
    delta.detach()
    assert torch.equal(first_output(model, batch), bare)


def test_prefix_rows_in_a_fused_projection_equal_the_causal_prefix_attention_written_out():
    from deltatune.zoo import ZooEntry, build

    model = build(ZooEntry("openai-gpt", "causal-lm", "OpenAIGPTLMHeadModel"))  # fused c_attn, no KV cache
    delta = PrefixModel(model, **SMALL)
    assert delta.positions[:2] == ["transformer.h.0.attn", "transformer.h.0.attn.c_attn"]
    batch = tiny_batch("bert")
    attention, seen = model.transformer.h[0].attn, {}
    handles = [model.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
               attention.register_forward_hook(lambda m, a, o: seen.update(out=o[0]))]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    keys, values = delta.deltas["transformer.h.0.attn"].table.key_values(range(1))[0]  # (1, n, 32) each
    x, heads, n = seen["x"], attention.n_head, 3
    split = lambda t: t.view(t.shape[0], -1, heads, 32 // heads).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q, k, v = (x @ attention.c_attn.weight + attention.c_attn.bias).split(32, dim=2)  # unhooked Conv1D
        k, v = (torch.cat([p.expand(2, -1, -1), t], dim=1) for p, t in ((keys, k), (values, v)))
        scores = split(q) @ split(k).transpose(2, 3) / (32 // heads) ** 0.5
        seven = torch.arange(7)
        visible = torch.cat([torch.ones(7, n), (seven[None, :] <= seven[:, None]).float()], dim=1).bool()  # causal
        visible = visible[None] & torch.cat([torch.ones(2, n), batch["attention_mask"]], dim=1).bool()[:, None]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        by_hand = attention.c_proj((scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(seen["out"][:, :5], by_hand[:, :5])  # row 0's padded tails differ in masking only
    torch.testing.assert_close(seen["out"][1], by_hand[1])


def test_prefix_rows_under_rotary_positions_keep_the_prefix_keys_unrotated():
    import transformers

    from deltatune.zoo import ZooEntry, build

    if not hasattr(transformers, "EuroBertForSequenceClassification"):
        pytest.skip(f"transformers {transformers.__version__} has no EuroBERT")
    model = build(ZooEntry("eurobert", "sequence-classification", "EuroBertForSequenceClassification"))
    attention, seen = model.model.layers[0].self_attn, {}
    attention.register_forward_pre_hook(lambda m, a, k: seen.update(inputs=dict(k)), with_kwargs=True)  # before
    delta = PrefixModel(model, **SMALL)  # the prefix's hooks come after: the call as the model makes it
    attention.register_forward_hook(lambda m, a, k, o: seen.update(out=o[0]), with_kwargs=True)
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keys, values = delta.deltas["model.layers.0.self_attn"].table.key_values(range(1))[0]
    x, (cos, sin) = seen["inputs"]["hidden_states"], seen["inputs"]["position_embeddings"]
    heads, kv_heads, d = model.config.num_attention_heads, model.config.num_key_value_heads, attention.head_dim
    linear = lambda layer, t: torch.nn.functional.linear(t, layer.weight, layer.bias)  # noqa: E731 (unhooked)
    split = lambda t, h: t.view(2, -1, h, d).transpose(1, 2)  # noqa: E731
    module = sys.modules[type(attention).__module__]
    with torch.no_grad():
        q, k = module.apply_rotary_pos_emb(split(linear(attention.q_proj, x), heads),
                                           split(linear(attention.k_proj, x), kv_heads), cos, sin)
        k = torch.cat([split(keys.expand(2, -1, -1), kv_heads), k], dim=2)  # prefix keys: no rotation
        v = torch.cat([split(values.expand(2, -1, -1), kv_heads), split(linear(attention.v_proj, x), kv_heads)], 2)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        visible = torch.cat([torch.ones(2, 3), batch["attention_mask"]], dim=1).bool()
        scores = q @ k.transpose(2, 3) * attention.scaling + torch.where(visible, 0.0, float("-inf"))[:, None, None]
        by_hand = linear(attention.o_proj, (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, heads * d))
    torch.testing.assert_close(seen["out"], by_hand)


def test_unsupported_models_and_arguments():
    with pytest.raises(ValueError, match="takes no modified_modules"):
        PrefixModel(tiny_model("llama"), ["q_proj"])


def test_encoder_decoder_parameter_count_covers_encoder_decoder_and_cross_attention():
    model = tiny_model("t5")  # 2 encoder and 2 decoder blocks, 4 heads of size 8
    delta = PrefixModel(model, **SMALL)
    assert delta.positions == ["decoder", "encoder.block.0.layer.0.SelfAttention",
                               "encoder.block.1.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention",
                               "decoder.block.1.layer.1.EncDecAttention"]
    width = (2 + 2 + 2) * 2 * 4 * 8
    assert delta.num_delta_parameters() == 3 * 16 + 16 * 16 + 16 + 16 * width + width


def _attention_by_hand(attention, x, keys_values, memory, mask_row):
    """softmax(q [K; k(m)]ᵀ · scaling + mask) [V; v(m)], projected: BART attention written out."""
    heads, size = attention.num_heads, attention.head_dim
    split = lambda t: t.view(t.shape[0], -1, heads, size).transpose(1, 2)  # noqa: E731
    q = split(attention.q_proj(x)) * attention.scaling
    keys = torch.cat([keys_values[0].expand(x.shape[0], -1, -1, -1), split(attention.k_proj(memory))], dim=2)
    values = torch.cat([keys_values[1].expand(x.shape[0], -1, -1, -1), split(attention.v_proj(memory))], dim=2)
    visible = torch.cat([torch.ones_like(mask_row[:, :1]).expand(-1, keys_values[0].shape[1]), mask_row], dim=1)
    scores = q @ keys.transpose(2, 3) + torch.where(visible.bool(), 0.0, float("-inf"))[:, None, None, :]
    out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(x.shape)
    return attention.out_proj(out)


def _marian():
    from deltatune.zoo import ZooEntry, build

    return build(ZooEntry("marian", "seq2seq-lm", "MarianMTModel"))  # encoder attentions without a layer_idx


@pytest.mark.parametrize("make", [lambda: tiny_model("bart"), _marian], ids=["bart", "marian"])
def test_bart_encoder_and_cross_attention_read_their_prefix_as_written_out(make):
    model = make()
    batch = tiny_batch("bart")
    delta = PrefixModel(model, **SMALL)
    table = delta.deltas["model.decoder"]
    layers = {"encoder": model.model.encoder.layers[0].self_attn, "cross": model.model.decoder.layers[0].encoder_attn}
    rows = [delta.deltas[n].layer for n in ("model.encoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn")]
    decoder_self, encoder_self, cross = table.key_values([0, *rows])  # rows: decoder self, encoder self, cross
    seen = {}

    def record(name):
        def hook(module, args, kwargs, output):
            seen[name] = (kwargs["hidden_states"], kwargs.get("key_value_states"), output[0])
        return hook

    handles = [module.register_forward_hook(record(name), with_kwargs=True) for name, module in layers.items()]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
        for handle in handles:
            handle.remove()
        mask = batch["attention_mask"]
        x, _, output = seen["encoder"]
        torch.testing.assert_close(output, _attention_by_hand(layers["encoder"], x, encoder_self, x, mask))
        x, memory, output = seen["cross"]
        torch.testing.assert_close(output, _attention_by_hand(layers["cross"], x, cross, memory, mask))
    assert [tuple(t.shape) for t in decoder_self] == [(4, 3, 8), (4, 3, 8)]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_generation_matches_a_full_forward_pass_and_reloads(family, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)  # row 0 is padded
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    delta = PrefixModel(model, **SMALL)
    options = {"max_new_tokens": 6, "do_sample": False, "decoder_start_token_id": 0, "pad_token_id": 0}
    generated = model.generate(**inputs, **options, output_logits=True, return_dict_in_generate=True)
    # The ground truth: one forward pass over the generated sequence gives the logits of every cached step.
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=generated.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(generated.logits, 1), logits, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(**inputs, **options, use_cache=False), generated.sequences)
    assert torch.equal(model.generate(**inputs, **options, num_beams=3),
                       model.generate(**inputs, **options, num_beams=3, use_cache=False))

    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -2:] = 7  # padded encoder tokens stay invisible, prefix or not
    torch.testing.assert_close(first_output(model, changed)[0], first_output(model, batch)[0], rtol=0, atol=1e-6)

    delta.fold()
    torch.testing.assert_close(model.generate(**inputs, **options), generated.sequences, rtol=0, atol=0)
    delta.save_finetuned(tmp_path / "prefix")
    fresh = tiny_model(family)
    DeltaBase.from_finetuned(tmp_path / "prefix", fresh)
    assert torch.equal(fresh.generate(**inputs, **options), generated.sequences)


def test_a_speech_recogniser_generates_with_its_prefix_with_or_without_a_cache():
    # Whisper's decoder hands its layers no cache under use_cache=False: the prefix call turns it on for itself.
    import transformers as tf

    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None)).eval()
    features = torch.randn(2, 8, 32)
    delta = PrefixModel(model, **SMALL)
    with torch.no_grad():
        for parameter in delta.delta_parameters():
            parameter.add_(torch.randn_like(parameter))
    options = {"input_features": features, "max_new_tokens": 6, "do_sample": False}
    generated = model.generate(**options, output_logits=True, return_dict_in_generate=True)
    assert (generated.sequences[:, 0] == 1).all()  # the decoder start (a plain generate() result leaves it out)
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=generated.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.stack(generated.logits, 1), logits, rtol=0, atol=1e-5)
    tokens = generated.sequences[:, 1:]
    assert torch.equal(model.generate(**options, use_cache=False), tokens)
    delta.detach()
    assert not torch.equal(model.generate(**options), tokens)  # the prefix mattered


def test_a_second_prefix_on_one_model_is_refused():
    model = tiny_model("llama")
    first = PrefixModel(model, **SMALL)
    with pytest.raises(ValueError, match="a module takes one Prefix, and one is attached here already; detach it"):
        PrefixModel(model, **SMALL)
    first.detach()
    second = PrefixModel(model, **SMALL)
    with pytest.raises(ValueError, match="a module takes one Prefix"):
        first.attach()
    assert second.attached and not first.attached
