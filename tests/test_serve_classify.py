"""/v1/classify: MiniLM-L6 serving classification deltas, each with the head it was trained with, in mixed batches."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from deltatune import DeltaBase, LoraModel
from deltatune.bank.registry import DeltaRegistry
from deltatune.cli.serve import labels_of

pytest.importorskip("uvicorn")
from deltatune.serve import Classification, Engine, Request, create_app  # noqa: E402  (needs the serve extra)

from test_serve import _http, serving  # noqa: E402

pytestmark = pytest.mark.real
TASKS = {"sentiment": ["negative", "positive"], "topic": ["sport", "science", "music"]}
TEXTS = ["A wonderful, moving film.", "The match ended in a draw after extra time.", "Dull and far too long."]


def _classifier(path: str, labels: list[str]):
    return tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels)).eval()


@pytest.fixture(scope="module")
def classify_server(minilm_path, tmp_path_factory):
    folders = {}
    torch.manual_seed(0)
    for name, labels in TASKS.items():
        model = _classifier(minilm_path, labels)
        delta = LoraModel(model, ["query", "value"]).freeze_module(exclude=["deltas", "classifier", "pooler"])
        with torch.no_grad():
            for p in [*delta.delta_parameters(), *model.classifier.parameters()]:
                p.add_(torch.randn_like(p) * 0.05)
        folders[name] = delta.save_finetuned(tmp_path_factory.mktemp(name))
    served = _classifier(minilm_path, TASKS["topic"])  # as wide as the widest head
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    registry = DeltaRegistry(served)
    for name, folder in folders.items():
        registry.register(name, folder, TASKS[name])
    engine = Engine(served, tokenizer, registry, window=0.05)
    with serving(create_app(engine, base_name="minilm-l6", max_inputs=8)) as port:
        yield Client(port), folders, engine


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        status, answer = _http(self.port, path, json.dumps(body).encode())
        return status, json.loads(answer)


def _alone(minilm_path, folder, labels, text) -> list[float]:
    model = _classifier(minilm_path, labels)
    DeltaBase.from_finetuned(folder, model)
    with torch.no_grad():
        return model(**tf.AutoTokenizer.from_pretrained(minilm_path)(text, return_tensors="pt")).logits[0].softmax(-1).tolist()


def test_concurrent_classifications_for_two_heads_equal_each_delta_alone(classify_server, minilm_path):
    client, folders, engine = classify_server
    import concurrent.futures

    batches = engine.stats["batches"]
    jobs = [(name, text) for name in TASKS for text in TEXTS]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.post("/v1/classify", {"model": job[0], "input": job[1]}), jobs))
    assert engine.stats["batches"] - batches < len(jobs)  # rows of both deltas shared batches
    for (name, text), (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        (result,) = answer["data"]
        expected = _alone(minilm_path, folders[name], TASKS[name], text)
        assert list(result["scores"]) == TASKS[name]
        assert list(result["scores"].values()) == pytest.approx(expected, abs=1e-5)
        assert result["label"] == TASKS[name][max(range(len(expected)), key=expected.__getitem__)]
    several = client.post("/v1/classify", {"model": "topic", "input": TEXTS})[1]
    assert [d["index"] for d in several["data"]] == [0, 1, 2] and several["usage"]["prompt_tokens"] > 10


def test_classify_errors_and_a_generation_server_refusing_it(classify_server):
    client, _, engine = classify_server
    cases = [({"model": "minilm-l6", "input": "x"}, 400, "bare backbone, whose head was never trained"),
             ({"model": "nope", "input": "x"}, 404, "does not exist"),
             ({"model": "topic", "input": []}, 400, "non-empty string or a non-empty list"),
             ({"model": "topic", "input": ["x"] * 9}, 400, "at most 8 per request")]
    for body, status, message in cases:
        answer = client.post("/v1/classify", body)
        assert answer[0] == status and message in answer[1]["error"]["message"], answer
    status, answer = client.post("/v1/completions", {"model": "topic", "prompt": "hi"})
    assert status == 400 and "classifies text (/v1/classify)" in answer["error"]["message"]
    with pytest.raises(ValueError, match="can only classify"):
        engine.submit(Request([1, 2], "topic", 2))
    assert json.loads(_http(client.port, "/health")[1])["status"] == "ok"


def test_labels_come_from_the_run_folder_or_the_saved_head(classify_server, tmp_path):
    _, folders, _ = classify_server
    assert labels_of(folders["topic"], {}) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert labels_of(folders["topic"], {"id2label": {"1": "b", "0": "a", "2": "c"}}) == ["a", "b", "c"]
    plain = LoraModel(tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)), ["query"])
    assert labels_of(plain.save_finetuned(tmp_path / "plain"), {}) is None  # no head of its own
    with pytest.raises(FileNotFoundError, match="neither a run folder of deltatune train, a deltatune checkpoint"):
        labels_of(tmp_path, {})


def test_a_peft_sequence_classification_adapter_is_served_with_its_head(classify_server, minilm_path, tmp_path):
    """PEFT's SEQ_CLS adapters save the head they trained (modules_to_save); served, each row gets it."""
    peft = pytest.importorskip("peft")
    client, _, engine = classify_server
    torch.manual_seed(1)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    wrapped = peft.get_peft_model(_classifier(minilm_path, TASKS["topic"]), config).eval()
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:  # LoRA and PEFT's copy of the head
                p.add_(torch.randn_like(p) * 0.05)
        expected = wrapped(**engine.tokenizer(TEXTS[0], return_tensors="pt")).logits[0].softmax(-1).tolist()
    wrapped.save_pretrained(tmp_path / "adapter")
    labels = labels_of(tmp_path / "adapter", {}, minilm_path)
    assert labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    own_head = engine.model.classifier.weight.clone()
    engine.registry.register("peft-topic", tmp_path / "adapter", labels)
    try:
        status, answer = client.post("/v1/classify", {"model": "peft-topic", "input": TEXTS[0]})
        assert status == 200, answer
        assert list(answer["data"][0]["scores"].values()) == pytest.approx(expected, abs=1e-5)
        assert torch.equal(engine.model.classifier.weight, own_head), "the adapter's head stays its own"
    finally:
        engine.registry.unregister("peft-topic")


def test_a_classification_needs_registered_labels(classify_server, minilm_path):
    _, folders, engine = classify_server
    registry = DeltaRegistry(engine.model)
    registry.register("unlabelled", folders["topic"])
    bare = Engine(engine.model, engine.tokenizer, registry)
    with pytest.raises(ValueError, match="registered without the labels of its head"):
        bare.submit(Classification([101, 102], "unlabelled"))
    bare.close()


def test_the_command_serves_run_folders_with_their_label_names(classify_server, minilm_path, tmp_path):
    """deltatune serve --task classify, as a user starts it: a run folder's training.json names the labels."""
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    _, folders, _ = classify_server
    run = tmp_path / "topic-run"
    shutil.copytree(folders["topic"], run / "delta")
    (run / "training.json").write_text(json.dumps({"backbone_options": {
        "num_labels": 3, "id2label": {str(i): label for i, label in enumerate(TASKS["topic"])}}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--task", "classify", "--backbone",
                               minilm_path, "--delta", f"topic={run}", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("deltatune serve: ")
        for _ in range(600):  # the line comes as uvicorn starts to bind
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        status, answer = Client(port).post("/v1/classify", {"model": "topic", "input": TEXTS[1]})
        assert status == 200, answer
        scores = answer["data"][0]["scores"]
        assert list(scores) == TASKS["topic"]
        assert list(scores.values()) == pytest.approx(_alone(minilm_path, folders["topic"], TASKS["topic"], TEXTS[1]),
                                                      abs=1e-5)
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
