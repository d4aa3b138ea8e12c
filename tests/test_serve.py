"""`deltatune serve` through the official openai client, on loopback: several deltas of SmolLM2-135M at once."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import transformers as tf

from deltatune import LoraModel, PrefixModel, SoftPromptModel
from deltatune.bank.registry import DeltaRegistry

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from deltatune.serve import Engine, Request, create_app  # noqa: E402  (needs the serve extra)

pytestmark = pytest.mark.real
PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is", "Once upon a time"]


def _random_delta(delta):
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return delta


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory):
    """The server on a free loopback port with three deltas saved to disk; yields (client, folders, model, tok)."""
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path)
    folders = {}
    torch.manual_seed(0)
    for name, build in {"lora": lambda: LoraModel(model, ["q_proj", "v_proj"], attach=False),
                        "prompt": lambda: SoftPromptModel(model, soft_token_num=4, attach=False),
                        "prefix": lambda: PrefixModel(model, prefix_token_num=3, reparameterize=False, attach=False)}.items():
        delta = _random_delta(build())
        folders[name] = delta.save_finetuned(tmp_path_factory.mktemp(name))
        del delta
    registry = DeltaRegistry(model)
    for name, folder in folders.items():
        registry.register(name, folder)
    engine = Engine(model, tokenizer, registry, max_batch=16, window=0.02, max_queue=64)
    app = create_app(engine, base_name="smollm2-135m", api_key="secret", max_prompt_tokens=64, max_new_tokens=32)
    with serving(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0, timeout=120)
        yield client, folders, model, tokenizer, port, engine


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on a free loopback port, in a thread; yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(60)


def _alone(model, tokenizer, folder, prompt, n):
    """Greedy tokens of one prompt with only that delta attached."""
    from deltatune import DeltaBase

    delta = DeltaBase.from_finetuned(folder, model, name="alone") if folder else None
    try:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        if delta is not None:
            delta.detach()


def test_concurrent_requests_for_several_deltas_equal_single_delta_generation(served):
    client, folders, model, tokenizer, _, engine = served
    jobs = [(name, prompt) for name in ["lora", "prompt", "prefix", "smollm2-135m"] for prompt in PROMPTS[:2]]
    batches_before = engine.stats["batches"]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model=job[0], prompt=job[1], max_tokens=6, temperature=0), jobs))
    assert engine.stats["batches"] - batches_before < len(jobs)  # some requests shared a batch
    texts = {}
    for (name, prompt), answer in zip(jobs, answers):
        assert answer.model == name and answer.usage.completion_tokens <= 6
        expected = _alone(model, tokenizer, folders.get(name), prompt, 6)
        assert answer.choices[0].text == expected, (name, prompt)
        texts[name, prompt] = expected
    assert len({texts[name, PROMPTS[0]] for name in ["lora", "prompt", "prefix", "smollm2-135m"]}) > 1


def test_streaming_chat_and_models(served):
    client, folders, model, tokenizer, _, _ = served
    assert [m.id for m in client.models.list()] == ["smollm2-135m", "lora", "prompt", "prefix"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="lora", messages=messages, max_tokens=8, temperature=0, stream=True) if chunk.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="prefix", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True))
    assert streamed == _alone(model, tokenizer, folders["prefix"], PROMPTS[0], 5)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    client, _, _, _, port, _ = served
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist; served: smollm2-135m, lora"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 32"):
        client.completions.create(model="lora", prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="the prompt has .* tokens; this server takes at most 64"):
        client.completions.create(model="lora", prompt="word " * 200, max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    status, answer = _http(port, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(answer)["error"]["message"]
    assert _announced_only(port, 2 << 20).startswith(b"HTTP/1.1 413")  # refused from its headers, body unread
    assert client.completions.create(model="lora", prompt="hi", max_tokens=2, temperature=0).choices[0].text
    metrics = _http(port, "/metrics")[1].decode()
    assert 'deltatune_http_responses_total{code="404"}' in metrics and "deltatune_batches_total" in metrics
    assert "deltatune_active_rows 0" in metrics  # nothing running between requests
    assert json.loads(_http(port, "/health")[1])["status"] == "ok"


@pytest.mark.parametrize("endpoint, option", [
    ("completions", {"presence_penalty": 0.5}), ("completions", {"seed": 1}), ("completions", {"logprobs": 0}),
    ("completions", {"best_of": 2}), ("completions", {"suffix": "!"}), ("completions", {"logit_bias": {"5": 10}}),
    ("chat", {"frequency_penalty": -1}), ("chat", {"response_format": {"type": "json_object"}}),
    ("chat", {"logprobs": True, "top_logprobs": 2}), ("chat", {"n": 2}),
])
def test_options_the_server_would_ignore_are_refused(served, endpoint, option):
    client = served[0]
    name = next(iter(option))
    with pytest.raises(openai.BadRequestError, match=rf"{name}=.* is not supported by this server") as refused:
        if endpoint == "chat":
            client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           **option)
        else:
            client.completions.create(model="lora", prompt="hi", max_tokens=2, **option)
    assert refused.value.body["param"] == name


def test_options_at_their_neutral_values_are_served(served):
    client = served[0]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "logit_bias": {}}
    answer = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            temperature=0, logprobs=False, response_format={"type": "text"}, **neutral)
    assert answer.choices[0].message.content is not None
    assert client.completions.create(model="lora", prompt="hi", max_tokens=2, temperature=0, echo=False,
                                     best_of=1, **neutral).choices[0].text


def _announced_only(port: int, length: int) -> bytes:
    """The answer to a request that announces a ``length``-byte body and sends none of it.  (Sending a body over
    the limit races the server closing the connection after its 413: the client may see a reset instead.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer secret\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        return connection.recv(65536)


def _http(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_bounded_loopback_load(served, capsys):
    """200 requests, 16 at a time, over three deltas and the backbone: all answered; throughput and latency."""
    client, *_ = served
    names = ["lora", "prompt", "prefix", "smollm2-135m"]

    def one(i):
        start = time.perf_counter()
        answer = client.completions.create(model=names[i % 4], prompt=PROMPTS[i % 4], max_tokens=4, temperature=0)
        return time.perf_counter() - start, answer.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    assert len(results) == 200 and all(r[1] >= 1 for r in results)
    with capsys.disabled():
        print(f"\nload: 200 requests, 16 concurrent, 4 deltas: {200 / elapsed:.1f} req/s, "
              f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {latencies[189] * 1000:.0f} ms")


def test_registry_evicts_least_recently_used_under_a_byte_budget(served, smollm2_path):
    _, folders, *_ = served
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    probe = DeltaRegistry(model)
    probe.register("lora", folders["lora"])
    assert probe.loaded == ["lora"]  # loaded to be checked, and kept: no budget
    size = probe.loaded_bytes()
    registry = DeltaRegistry(model, max_bytes=size)
    registry.register("a", folders["lora"])
    registry.register("b", folders["lora"])
    assert registry.loaded == ["a"] and registry.evictions == 0  # b would have unloaded a: let go until asked for
    registry.acquire(["a"])
    registry.acquire(["b"])
    assert registry.loaded == ["b"] and registry.evictions == 1
    with pytest.raises(MemoryError, match="do not fit max_bytes"):
        registry.acquire(["a", "b"])
    with pytest.raises(KeyError, match="no delta named 'c'; known: a, b"):
        registry.acquire(["c"])
    registry.unregister("b")
    assert registry.names == ["a"] and registry.loaded == []
    with pytest.raises(FileNotFoundError, match="neither a deltatune checkpoint"):
        registry.register("x", folders["lora"].parent)



def test_closing_the_engine_finishes_the_queued_requests(served):
    _, folders, model, tokenizer, *_ = served
    registry = DeltaRegistry(model)
    registry.register("lora", folders["lora"])
    engine = Engine(model, tokenizer, registry, max_batch=2, window=0.0)
    done = []
    for i in range(5):
        engine.submit(Request(tokenizer(PROMPTS[i % 4])["input_ids"], "lora" if i % 2 else None, 3,
                              on_done=lambda tokens, reason, error: done.append((tokens, error))))
    engine.close()
    assert len(done) == 5 and all(error is None and len(tokens) >= 1 for tokens, error in done)
    assert engine.stats["batches"] >= 3  # at most 2 rows a batch


def test_stop_strings_end_a_completion_before_them_streamed_or_not(served):
    client, folders, model, tokenizer, *_ = served
    expected = _alone(model, tokenizer, folders["lora"], PROMPTS[1], 12)
    words = expected.split()
    assert len(words) >= 3, expected
    stop = " " + words[2]  # ends the text before its third word
    cut = expected[:expected.find(stop)]
    whole = client.completions.create(model="lora", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                      stop=[stop, "never appears"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 12
    pieces = [c.choices[0].text for c in client.completions.create(
        model="lora", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == cut
    unstopped = client.completions.create(model="lora", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          stop="never appears")
    assert unstopped.choices[0].text == expected and unstopped.choices[0].finish_reason == "length"
    for bad in (["a", "b", "c", "d", "e"], [""], [3]):
        with pytest.raises(openai.BadRequestError, match="stop must be a non-empty string or a list of up to 4"):
            client.completions.create(model="lora", prompt="hi", max_tokens=2, stop=bad)


def test_streamed_text_holds_back_what_may_start_a_stop_string():
    from deltatune.serve.text import Text

    class Characters:  # a tokenizer whose tokens are characters
        def decode(self, tokens, skip_special_tokens=True):
            return "".join(map(chr, tokens))

    text = Text(Characters(), ("abc", "zz"))
    pieces = [text.add(ord(c)) for c in "xyab_q abz abc rest"] + [text.add(None)]
    assert "".join(pieces) == "xyab_q abz " and text.stopped
    assert pieces[2:4] == ["", ""]  # "a", "ab": maybe the start of "abc", held back until "_" shows they are not
    text = Text(Characters(), ("abc",))
    assert [text.add(ord(c)) for c in "xab"] + [text.add(None)] == ["x", "", "", "ab"]  # the end releases the rest


def test_a_continuous_batching_server_answers_as_each_delta_alone(served):
    _, folders, model, tokenizer, *_ = served
    registry = DeltaRegistry(model)
    for name in ("lora", "prompt"):
        registry.register(name, folders[name])
    engine = Engine(model, tokenizer, registry, max_batch=8, window=0.02, continuous=True)
    app = create_app(engine, base_name="smollm2-135m", max_prompt_tokens=64, max_new_tokens=32)
    jobs = [(name, prompt, n) for name in ("lora", "smollm2-135m") for prompt, n in zip(PROMPTS, (8, 3, 6, 4))]
    with serving(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: client.completions.create(
                model=job[0], prompt=job[1], max_tokens=job[2], temperature=0), jobs))
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="lora", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True))
        with pytest.raises(openai.BadRequestError, match="'prompt' is a soft_prompt, which adds positions"):
            client.completions.create(model="prompt", prompt="hi", max_tokens=2)
    engine.close()
    for (name, prompt, n), answer in zip(jobs, answers):
        assert answer.choices[0].text == _alone(model, tokenizer, folders.get(name), prompt, n), (name, prompt)
    assert streamed == _alone(model, tokenizer, folders["lora"], PROMPTS[0], 5)
    assert engine.stats["requests"] == len(jobs) + 1 and engine.stats["failed"] == 0
