"""The lifecycle on real pretrained weights: MiniLM-L6 (encoder) and SmolLM2-135M (decoder)."""

import pytest
import torch
import transformers as tf

from deltatune import AdapterModel, BitFitModel, DeltaBase, LoraModel

pytestmark = pytest.mark.real

SENTENCES = [
    "a gripping, beautifully acted film that stays with you.",
    "tedious, overlong and never once funny.",
    "the best thing i have seen all year.",
    "a mess of a plot with nothing to say.",
] * 2
LABELS = torch.tensor([1, 0, 1, 0] * 2)

def train(model, delta, batch, lr: float, steps: int) -> list[float]:
    """AdamW on the delta's trainable parameters; the loss of every step."""
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


METHODS = {
    "lora": (LoraModel, ["query", "value"]),
    "adapter": (AdapterModel, ["attention.output", r"[r]layer\.\d+\.output"]),
    "bitfit": (BitFitModel, ["query", "key", "value", "dense", "LayerNorm"]),
}
LEARNING_RATES = {"lora": 3e-3, "adapter": 3e-3, "bitfit": 1e-2}  # bias-only tuning wants a larger step


def test_lora_on_minilm_has_the_closed_form_parameter_count(minilm):
    delta = LoraModel(minilm, ["query", "value"], lora_r=8)
    assert delta.num_delta_parameters() == 6 * 2 * (384 * 8 + 8 * 384) == 73_728


@pytest.mark.parametrize("method", sorted(METHODS))
def test_minilm_lifecycle(method, minilm, minilm_tokenizer, minilm_path, tmp_path):
    batch = minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = minilm(**batch).logits
    frozen_before = {k: v.clone() for k, v in minilm.state_dict().items() if not k.startswith("classifier")}
    cls, positions = METHODS[method]
    delta = cls(minilm, positions).freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        assert torch.equal(minilm(**batch).logits, reference), "identity at init"

    minilm.train()
    losses = train(minilm, delta, dict(batch, labels=LABELS), LEARNING_RATES[method], steps=8)
    minilm.eval()
    assert losses[-1] < 0.7 * losses[0], losses
    for key, value in minilm.state_dict().items():  # filtered: only trainable tensors
        assert "deltas" in key or key.startswith("classifier"), key
    delta.detach()
    assert all(torch.equal(frozen_before[k], v) for k, v in minilm.state_dict().items() if k in frozen_before)
    delta.attach()
    with torch.no_grad():
        tuned = minilm(**batch).logits

    delta.save_finetuned(tmp_path / method)
    fresh = tf.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    DeltaBase.from_finetuned(tmp_path / method, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, tuned)

    if cls.mergeable and method == "lora":
        delta.merge()
        assert not any(m._forward_hooks for m in minilm.modules())
        with torch.no_grad():
            torch.testing.assert_close(minilm(**batch).logits, tuned, rtol=0, atol=1e-5)
        delta.unmerge()
        with torch.no_grad():
            torch.testing.assert_close(minilm(**batch).logits, tuned, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path)
    return model, tokenizer


def test_smollm2_lora_trains_and_generates(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    bare = model.generate(**prompt, max_new_tokens=8, do_sample=False)

    delta = LoraModel(model, ["q_proj", "v_proj"], lora_r=8).freeze_module()
    assert delta.num_delta_parameters() == 30 * 8 * ((576 + 576) + (576 + 192))
    text = tokenizer(["Delta tuning trains a few parameters and keeps the backbone frozen.",
                      "The quick brown fox jumps over the lazy dog near the river bank."],
                     return_tensors="pt", padding=True)
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    losses = train(model, delta, dict(text, labels=labels), lr=2e-3, steps=4)
    assert losses[-1] < losses[0], losses

    tuned = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tuned.shape[1] > prompt["input_ids"].shape[1]
    delta.detach()
    assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), bare)
    for p in model.parameters():
        p.requires_grad_(True)


SENTENCES_LM = ["Delta tuning trains a few parameters.", "The backbone stays frozen.",
                "Paris is the capital of France.", "Cats sleep for most of the day."] * 2
# (options, learning rate, steps).  The reparameterized prefix is unstable under AdamW on SmolLM2 (every one of the
# MLP's 5.9M output weights moves by lr, coherently: one step at lr 1e-4 took the loss 6.08 -> 8.04), so the prefix
# is trained directly, as docs/methods.md recommends for decoder LLMs.
PROMPT_METHODS = {"soft_prompt": ({"soft_token_num": 16}, 0.05, 12),
                  "prefix": ({"prefix_token_num": 8, "reparameterize": False}, 1e-2, 20)}


@pytest.mark.compat
@pytest.mark.parametrize("method", sorted(PROMPT_METHODS))
def test_smollm2_prompt_methods_learn_and_generate_left_padded_batches(smollm2, method):
    from deltatune import PrefixModel, SoftPromptModel

    model, tokenizer = smollm2
    torch.manual_seed(0)
    text = tokenizer(SENTENCES_LM, return_tensors="pt", padding=True)
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    options, lr, steps = PROMPT_METHODS[method]
    delta = (SoftPromptModel if method == "soft_prompt" else PrefixModel)(model, **options).freeze_module()
    try:
        _learn_and_generate(model, tokenizer, delta, text, labels, lr, steps)
    finally:  # the model is shared by the module's tests
        delta.detach()
        for p in model.parameters():
            p.requires_grad_(True)


def _learn_and_generate(model, tokenizer, delta, text, labels, lr, steps):
    losses = train(model, delta, dict(text, labels=labels), lr, steps)
    assert losses[-1] < 0.5 * losses[0], losses

    prompts = tokenizer(["The capital of France is", "Cats"], return_tensors="pt", padding=True, padding_side="left")
    assert prompts["attention_mask"][1, 0] == 0, "the short prompt is left-padded"
    generate = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        cached = model.generate(**prompts, **generate)
        assert torch.equal(cached, model.generate(**prompts, **generate, use_cache=False))


AUTO_TYPES = ["lora", "adapter", "low_rank_adapter", "compacter", "bitfit", "ia3", "parallel_adapter"]


@pytest.mark.parametrize("delta_type", AUTO_TYPES)
def test_autodelta_defaults_on_the_real_models(delta_type, minilm, minilm_tokenizer, smollm2, tmp_path):
    from deltatune import AutoDeltaModel

    model, tokenizer = smollm2
    for backbone, tok, family in ((minilm, minilm_tokenizer, "bert"), (model, tokenizer, "llama")):
        batch = tok(SENTENCES[:2], return_tensors="pt", padding=True)
        labels = torch.tensor([1, 0]) if family == "bert" else batch["input_ids"]
        delta = AutoDeltaModel.from_config({"delta_type": delta_type}, backbone_model=backbone)
        try:
            assert delta.default_positions_of == family
            if delta_type == "lora":
                assert len(delta.positions) == (12 if family == "bert" else 60)
                assert delta.num_delta_parameters() == (73_728 if family == "bert" else 460_800)
            delta.freeze_module()
            backbone(**batch, labels=labels).loss.backward()
            torch.optim.SGD(delta.trainable_parameters(), lr=0.1).step()
            with torch.no_grad():
                tuned = backbone(**batch).logits
            delta.save_finetuned(tmp_path / family)
        finally:
            delta.detach()
            for p in backbone.parameters():
                p.requires_grad_(True)
        loaded = AutoDeltaModel.from_finetuned(tmp_path / family, backbone)  # the bare model again, after detach
        try:
            assert type(loaded) is type(delta) and loaded.positions == delta.positions
            with torch.no_grad():
                assert torch.equal(backbone(**batch).logits, tuned)
        finally:
            loaded.detach()
