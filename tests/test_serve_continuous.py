"""Continuous batching: requests join a running generation and leave it when done; each equals its delta alone."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf

from deltatune import AutoDeltaModel, DeltaBase, IA3Model, LoraModel, PrefixModel, SoftPromptModel
from deltatune.bank.registry import DeltaRegistry
from deltatune.methods.adapter import AdapterModel

pytest.importorskip("fastapi")
from deltatune.serve import Engine, Request  # noqa: E402  (needs the serve extra)

PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is", "Once upon a time",
           "The best way to learn a language"]


@pytest.fixture(scope="module")
def decoder(tiny_decoder, tmp_path_factory):
    """The tiny LLaMA, its tokenizer and saved deltas of five kinds."""
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_decoder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_decoder)
    builds = {"lora": lambda: LoraModel(model, ["q_proj", "v_proj"], attach=False),
              "adapter": lambda: AdapterModel(model, ["self_attn", "mlp"], attach=False),
              "ia3": lambda: IA3Model(model, attach=False),
              "prompt": lambda: SoftPromptModel(model, soft_token_num=4, attach=False),
              "prefix": lambda: PrefixModel(model, prefix_token_num=3, reparameterize=False, attach=False)}
    folders = {}
    torch.manual_seed(0)
    for name, build in builds.items():
        delta = build()
        with torch.no_grad():
            for p in delta.delta_parameters():
                p.add_(torch.randn_like(p) * 0.5)
        folders[name] = delta.save_finetuned(tmp_path_factory.mktemp(name))
        del delta
    return model, tokenizer, folders


def _alone(model, tokenizer, folder, prompt: str, n: int) -> list[int]:
    """Greedy tokens of one prompt with only that delta attached, up to the end-of-sequence token."""
    delta = DeltaBase.from_finetuned(folder, model, name="alone") if folder else None
    try:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        tokens = out[0, ids.shape[1]:].tolist()
        return tokens[:tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
    finally:
        if delta is not None:
            delta.detach()


def _engine(model, tokenizer, folders, names, **options) -> Engine:
    registry = DeltaRegistry(model)
    for name in names:
        registry.register(name, folders[name])
    return Engine(model, tokenizer, registry, **{"continuous": True, **options})


class _Answers:
    """Each request's answer, in the order they finish; ``hold`` pauses the engine inside request 0's second token
    until it is set (so requests submitted meanwhile arrive while request 0 runs)."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.done: dict[int, tuple] = {}
        self.order: list[int] = []
        self.hold, self.holding = hold, threading.Event()
        self.changed = threading.Condition()

    def request(self, index: int, prompt: list[int], delta: str | None, n: int, **sampling) -> Request:
        seen = []

        def on_token(token):
            seen.append(token)
            if index == 0 and len(seen) == 2 and self.hold is not None:
                self.holding.set()
                assert self.hold.wait(60)

        def on_done(tokens, reason, error):
            with self.changed:
                self.done[index] = (tokens, reason, error)
                self.order.append(index)
                self.changed.notify_all()
        return Request(prompt, delta, n, on_token=on_token, on_done=on_done, **sampling)

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.done) == count, timeout=120), "the engine did not answer"


@pytest.mark.compat
def test_requests_join_a_running_batch_and_each_equals_its_delta_alone(decoder):
    model, tokenizer, folders = decoder
    engine = _engine(model, tokenizer, folders, ["lora", "adapter", "ia3"], max_batch=8, window=0.0)
    submitted = threading.Event()
    answers = _Answers(hold=submitted)
    first = [("lora", 12), (None, 3), ("adapter", 9)]
    later = [("ia3", 7), ("lora", 5), (None, 10), ("adapter", 4)]
    jobs = first + later
    try:
        for i, (delta, n) in enumerate(first):
            engine.submit(answers.request(i, tokenizer(PROMPTS[i % 5])["input_ids"], delta, n))
        assert answers.holding.wait(60)  # request 0 is running: the engine waits inside its second token
        assert 1 <= engine.active <= len(first)  # the first requests, in one prefill or more
        for i, (delta, n) in enumerate(later, start=len(first)):
            engine.submit(answers.request(i, tokenizer(PROMPTS[i % 5])["input_ids"], delta, n))
        submitted.set()
        answers.wait_for(len(jobs))
    finally:
        submitted.set()
        engine.close()
    expected = [_alone(model, tokenizer, folders.get(delta), PROMPTS[i % 5], n) for i, (delta, n) in enumerate(jobs)]
    for i, (delta, n) in enumerate(jobs):
        tokens, reason, error = answers.done[i]
        assert error is None and tokens == expected[i], (i, delta)
        assert reason == ("length" if len(expected[i]) == n else "stop")
    # The later requests joined request 0's batch and left it before it ended (4 tokens against its 12).
    assert len(expected[0]) == 12 and len(expected[6]) == 4
    assert answers.order.index(6) < answers.order.index(0)
    assert engine.stats["requests"] == len(jobs) and engine.stats["failed"] == 0 and engine.active == 0
    assert engine.stats["batches"] >= 2  # the later requests joined in a prefill of their own
    assert engine.stats["tokens"] == sum(map(len, expected))
    # The deltas change the answers, so the equalities above are not the bare model's by accident.
    assert len({tuple(_alone(model, tokenizer, folders.get(d), PROMPTS[0], 6)) for d in ("lora", "adapter", None)}) > 1


def test_sampled_and_greedy_rows_share_a_batch(decoder):
    model, tokenizer, folders = decoder
    engine = _engine(model, tokenizer, folders, ["lora"], max_batch=4, window=0.05)
    answers = _Answers()
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    try:
        engine.submit(answers.request(0, prompt, "lora", 6))
        engine.submit(answers.request(1, prompt, "lora", 6, temperature=0.9, top_p=0.8))
        engine.submit(answers.request(2, prompt, None, 6, temperature=1.5))
        answers.wait_for(3)
    finally:
        engine.close()
    assert answers.done[0][0] == _alone(model, tokenizer, folders["lora"], PROMPTS[0], 6)
    for i in (1, 2):
        tokens, _, error = answers.done[i]
        assert error is None and 1 <= len(tokens) <= 6 and all(0 <= t < len(tokenizer) for t in tokens)
    # Sampled, not greedy: at temperature 1.5 a tiny random model's next token is close to uniform over 49k tokens.
    assert answers.done[2][0] != _alone(model, tokenizer, None, PROMPTS[0], 6)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_models_equal_each_request_alone_past_the_window(family, decoder, tmp_path):
    # Mistral slides every layer, Gemma-2 every other one; prompts of 9 to 13 tokens and answers of up to 10 run past
    # the window of 4, and the window changes every answer (checked below), so the equality is not the full mask's.
    _, tokenizer, _ = decoder
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=4, eos_token_id=tokenizer.eos_token_id)
    config = tf.MistralConfig(**sizes) if family == "mistral" else tf.Gemma2Config(**sizes, head_dim=8)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    lora = LoraModel(model, attach=False)
    with torch.no_grad():
        for p in lora.delta_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    folders = {"lora": lora.save_finetuned(tmp_path / "lora")}
    long_prompts = [p + " and the rest of it, slowly" for p in PROMPTS[:3]]
    jobs = [(long_prompts[i], delta, n) for i in range(3) for delta, n in (("lora", 10), (None, 6))]
    engine = _engine(model, tokenizer, folders, ["lora"], max_batch=8, window=0.0)
    answers = _Answers()
    try:
        for i, (prompt, delta, n) in enumerate(jobs):
            engine.submit(answers.request(i, tokenizer(prompt)["input_ids"], delta, n))
        answers.wait_for(len(jobs))
    finally:
        engine.close()
    expected = [_alone(model, tokenizer, folders.get(delta), prompt, n) for prompt, delta, n in jobs]
    assert [answers.done[i][0] for i in range(len(jobs))] == expected
    model.config.sliding_window = 1000
    assert all(_alone(model, tokenizer, folders.get(d), p, n) != e for (p, d, n), e in zip(jobs, expected))


def test_closing_finishes_queued_and_running_requests(decoder):
    model, tokenizer, folders = decoder
    engine = _engine(model, tokenizer, folders, ["lora"], max_batch=2, window=0.0)
    answers = _Answers()
    for i in range(5):
        engine.submit(answers.request(i, tokenizer(PROMPTS[i])["input_ids"], "lora" if i % 2 else None, 3 + i))
    engine.close()
    assert sorted(answers.done) == list(range(5))
    assert all(error is None and tokens for tokens, _, error in answers.done.values())


def test_deltas_that_add_positions_and_unsupported_models_are_refused(decoder, tiny_backbone):
    model, tokenizer, folders = decoder
    engine = _engine(model, tokenizer, folders, ["lora", "prompt", "prefix"])
    try:
        for name, kind in (("prompt", "soft_prompt"), ("prefix", "prefix")):
            with pytest.raises(ValueError, match=f"delta '{name}' is a {kind}, which adds positions"):
                engine.check_servable(name)
            with pytest.raises(ValueError, match="serve it without --continuous"):
                engine.submit(Request(tokenizer("hi")["input_ids"], name, 2))
        with pytest.raises(KeyError, match="no delta named 'nope'; known: lora, prompt, prefix"):
            engine.submit(Request(tokenizer("hi")["input_ids"], "nope", 2))
    finally:
        engine.close()
    penalised = tf.AutoModelForCausalLM.from_pretrained(model.name_or_path)
    penalised.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="also sets repetition_penalty; serve it without --continuous"):
        Engine(penalised, tokenizer, DeltaRegistry(penalised), continuous=True)
    classifier = tf.AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2)
    with pytest.raises(ValueError, match="continuous batching is for generation"):
        Engine(classifier, tokenizer, DeltaRegistry(classifier), continuous=True)


def test_the_command_refuses_continuous_batching_of_deltas_that_add_positions(decoder, tiny_decoder, capsys):
    from deltatune.cli import main

    _, _, folders = decoder
    assert main(["serve", "--continuous", "--backbone", str(tiny_decoder), "--delta", f"l={folders['lora']}",
                 "--delta", f"p={folders['prefix']}", "--port", "0"]) == 2
    assert "delta 'p' is a prefix, which adds positions" in capsys.readouterr().err
    assert main(["serve", "--continuous", "--task", "classify", "--backbone", str(tiny_decoder), "--delta",
                 f"l={folders['lora']}"]) == 2
    assert "--continuous is for generation" in capsys.readouterr().err


def test_a_peft_lora_adapter_is_served_and_other_peft_types_are_refused_at_registration(decoder, tmp_path):
    model, tokenizer, folders = decoder
    lora = DeltaBase.from_finetuned(folders["lora"], model, attach=False, name="exported")
    lora.export_peft(tmp_path / "peft-lora")
    registry = DeltaRegistry(model)
    registry.register("peft", tmp_path / "peft-lora")
    assert registry.delta_type("peft") == "lora"
    engine = Engine(model, tokenizer, registry, continuous=True)
    answers = _Answers()
    try:
        engine.submit(answers.request(0, tokenizer(PROMPTS[0])["input_ids"], "peft", 6))
        answers.wait_for(1)
    finally:
        engine.close()
    assert answers.done[0][0] == _alone(model, tokenizer, folders["lora"], PROMPTS[0], 6)
    (tmp_path / "peft-prompt").mkdir()
    (tmp_path / "peft-prompt" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(ValueError, match="peft_type is 'PROMPT_TUNING', only 'LORA' is read"):
        registry.register("prompt", tmp_path / "peft-prompt")
    assert registry.names == ["peft"]


def test_a_delta_that_cannot_be_served_is_refused_at_registration_not_in_the_batches_it_would_share(decoder,
                                                                                                     tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model, _, folders = decoder
    registry = DeltaRegistry(model)
    broken = shutil.copytree(folders["lora"], tmp_path / "broken")
    weights = broken / "delta_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        registry.register("broken", broken)

    DeltaBase.from_finetuned(folders["lora"], model, attach=False, name="to-export").export_peft(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k.replace("layers.0.", "layers.7."): t for k, t in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match=r"has no module\(s\) \[.model.layers.7.self_attn.q_proj"):  # a deeper model
        registry.register("deeper", tmp_path / "peft")

    paired = AutoDeltaModel.from_config({"delta_type": "parallel_adapter", "modified_modules": ["gate_proj"],
                                         "output_modules": ["down_proj"]}, model, attach=False, name="paired")
    with pytest.raises(TypeError, match="without a row form: KeepInput, PairedAdapterLayer"):
        registry.register("paired", paired.save_finetuned(tmp_path / "paired"))

    other = tf.LlamaModel(model.config)  # another model class (no LM head)
    with pytest.raises(ValueError, match="was trained on a LlamaModel backbone, this one is LlamaForCausalLM"):
        registry.register("other", LoraModel(other, ["q_proj"]).save_finetuned(tmp_path / "other"))
    assert registry.names == [] and registry.loaded == []


@pytest.mark.parametrize("continuous", [False, True])
def test_a_delta_registered_while_a_batch_runs_loads_between_batches_and_the_batch_is_untouched(decoder, continuous):
    """Loading an adapter runs a probe forward pass with hooks of its own: it waits for the batch in flight."""
    model, tokenizer, folders = decoder
    engine = _engine(model, tokenizer, folders, ["lora"], window=0.0, continuous=continuous)
    inside, release, engine_thread = threading.Event(), threading.Event(), []

    def pause(module, args):  # the engine's first forward pass (a prefill) waits here, inside its batch
        if not engine_thread:
            engine_thread.append(threading.current_thread())
            inside.set()
            assert release.wait(60)

    handle = model.model.layers[0].register_forward_pre_hook(pause)
    answers = _Answers()
    outcome = []

    def register():
        try:
            engine.registry.register("adapter", folders["adapter"])
            outcome.append("registered")
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            outcome.append(error)

    try:
        engine.submit(answers.request(0, tokenizer(PROMPTS[0])["input_ids"], "lora", 8))
        assert inside.wait(60)
        registering = threading.Thread(target=register)
        registering.start()
        registering.join(0.5)  # time to meet the batch
        waited = registering.is_alive()  # it waits for the batch's lock (without it, it loads meanwhile)
        release.set()
        registering.join(60)
        answers.wait_for(1)
    finally:
        release.set()
        handle.remove()
        engine.close()
    assert waited and outcome == ["registered"]
    tokens, _, error = answers.done[0]
    assert error is None and tokens == _alone(model, tokenizer, folders["lora"], PROMPTS[0], 8)
