"""The web selector: what the Python caller receives after clicks in headless Chromium, and its security."""

import json
import os
import queue
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from torch import nn

from deltatune import LoraModel
from deltatune.selector import select_modules
from deltatune.visualization import Visualization

ARTIFACTS = Path(os.environ.get("DELTATUNE_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Running:
    """``call()`` (a selector-starting function) in a thread; the URL it announced; its result or exception."""

    def __init__(self, call) -> None:
        self.urls: queue.Queue[str] = queue.Queue()
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()
        self.url = self.urls.get(timeout=60)
        self.token = urlsplit(self.url).query.removeprefix("token=")
        self.base = self.url.split("/?")[0]

    def _run(self, call) -> None:
        try:
            self.outcome["value"] = call(lambda line: self.urls.put(line.split(" at ")[1].split()[0]))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.outcome["error"] = error

    def post(self, route: str, body: dict, token: str | None = "own", host: str | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.base + route, data=json.dumps(body).encode(), method="POST")
        if token is not None:
            request.add_header("X-Deltatune-Token", self.token if token == "own" else token)
        if host:
            request.add_header("Host", host)
        return _open(request)

    def result(self):
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["value"]


def _open(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return response.status, (json.loads(body) if response.headers["Content-Type"] == "application/json"
                                     else {"html": body.decode()})
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Pair(nn.Module):
    def __init__(self, names=("first", "second")) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: nn.Linear(4, 4) for name in names})

    def forward(self, x):
        return sum(module(x) for module in self.parts.values())


def _tiny_selector(model, **options) -> Running:
    return Running(lambda announce: select_modules(model, pseudo_input=torch.zeros(1, 4), announce=announce,
                                                   lora_r=2, **options))


@pytest.fixture()
def tiny():
    return Pair()


def test_api_previews_costs_and_returns_the_submission(tiny):
    running = _tiny_selector(tiny)
    assert running.post("/api/match", {"spec": "[r]f.*"}) == (200, {"names": ["parts.first"]})
    status, answer = running.post("/api/match", {"spec": "third"})
    assert status == 400 and "matches no module" in answer["error"]
    assert running.post("/api/cost", {"modules": ["parts.second", "parts.first"]}) == (
        200, {"positions": ["parts.first", "parts.second"], "parameters": 2 * 2 * (4 + 4)})  # model order; LoRA r=2
    status, answer = running.post("/api/cost", {"modules": ["parts"]})
    assert status == 400 and "did not produce a tensor during the probe forward pass: ['parts']" in answer["error"]
    status, answer = running.post("/api/submit", {"modules": ["parts.nope"]})
    assert status == 400 and "has no module(s) ['parts.nope']" in answer["error"]
    assert running.post("/api/submit", {"modules": ["parts.second"]}) == (200, {"modules": ["parts.second"]})
    assert running.result() == ["parts.second"]


def test_server_listens_on_loopback_only_and_wants_its_token(tiny):
    running = _tiny_selector(tiny, timeout=60)
    port = urlsplit(running.url).port
    assert urlsplit(running.url).hostname == "127.0.0.1"
    for address in _other_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2)
    assert _open(urllib.request.Request(running.base + "/"))[0] == 403  # no token
    assert _open(urllib.request.Request(running.base + "/?token=guess"))[0] == 403
    assert _open(urllib.request.Request(running.base + "/static/app.js?token=" + running.token))[0] == 404
    assert running.post("/api/submit", {"modules": ["parts.first"]}, token=None)[0] == 403
    assert running.post("/api/submit", {"modules": ["parts.first"]}, token="guess")[0] == 403
    assert running.post("/api/submit", {"modules": ["parts.first"]}, host="attacker.example:80")[0] == 403
    assert running.post("/api/other", {})[0] == 404
    status, page = _open(urllib.request.Request(running.url))
    assert status == 200 and "<html" in page["html"]
    running.post("/api/submit", {"modules": ["parts.first"]})
    assert running.result() == ["parts.first"]
    with pytest.raises(OSError):  # the server is gone after the submission
        socket.create_connection(("127.0.0.1", port), timeout=2)


def _other_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (none on an isolated machine: nothing to check then)."""
    addresses = set()
    try:
        addresses |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except socket.gaierror:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # sends nothing: only picks the interface a packet would leave by
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in addresses if not a.startswith("127.") and a != "0.0.0.0")


def test_timeout_stops_the_server(tiny):
    running = _tiny_selector(tiny, timeout=1)
    with pytest.raises(TimeoutError, match="no selection was submitted within 1 s"):
        running.result()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", urlsplit(running.url).port), timeout=2)


def test_interactive_modify_refuses_modified_modules_too(tiny):
    with pytest.raises(ValueError, match="either modified_modules or interactive_modify"):
        LoraModel(tiny, ["first"], interactive_modify=True)


# ------------------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "the browser tests need Debian's chromium (make test installs it where apt-get is usable)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.mark.real
def test_ticking_query_and_value_in_chromium_builds_the_73728_parameter_lora(minilm, browser):
    result = {}
    running = Running(lambda announce: result.setdefault("delta", _interactive_lora(minilm, announce)))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(running.url)
    for label in ["bert", "encoder", "layer.0-5", "attention", "self"]:  # expand down to the folded projections
        page.click(f'li[data-label="{label}"] > .toggle')
    projections = page.locator('li[data-label="query,key,value"]')
    projections.locator('label[data-member="query"] input').check()
    projections.locator('label[data-member="value"] input').check()
    expect = pytest.importorskip("playwright.sync_api").expect  # waits: the cost comes from the server
    expect(page.locator("#cost")).to_have_text("73,728")
    expect(page.locator("#count")).to_have_text("12")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "selector.png"), full_page=True)
    page.click("#submit")
    expect(page.locator("#status")).to_have_text("Submitted 12 modules. You can close this page.")
    running.result()
    delta = result["delta"]
    expected = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    assert delta.positions == expected and delta.config.modified_modules == expected
    assert delta.num_delta_parameters() == 73_728 and delta.attached


def _interactive_lora(model, announce):
    import deltatune.selector as selector

    original = selector.select_modules
    selector.select_modules = lambda *args, **kwargs: original(*args, announce=announce, **kwargs)
    try:
        return LoraModel(model, interactive_modify=True)
    finally:
        selector.select_modules = original


def test_a_module_named_script_is_rendered_as_text(browser, tmp_path):
    name = "<script>pwned=1</script><img src=x onerror=pwned=2>"  # no dots: a module name
    model = Pair((name, "plain"))
    html = Visualization(model).save_html(tmp_path / "tree.html").read_text()
    assert "<script>pwned" not in html and "<img src=x" not in html
    running = _tiny_selector(model)
    for url in [running.url, (tmp_path / "tree.html").as_uri()]:
        page = browser.new_page()
        page.goto(url)
        assert page.evaluate("window.pwned") is None
        assert page.get_by_text(name, exact=True).count() >= 1  # shown, literally
        page.close()
    running.post("/api/submit", {"modules": ["parts.plain"]})
    assert running.result() == ["parts.plain"]


def test_ctrl_c_stops_the_server_and_propagates(tiny, monkeypatch):
    from deltatune.selector.server import SelectorServer

    def interrupted(timeout=None):
        raise KeyboardInterrupt  # as Ctrl-C arrives while the caller waits for a submission

    started = SelectorServer.start

    def start(self):
        started(self)
        self.finished.wait = interrupted
        return self

    ports = []
    monkeypatch.setattr(SelectorServer, "start", start)
    with pytest.raises(KeyboardInterrupt):
        select_modules(tiny, pseudo_input=torch.zeros(1, 4), announce=lambda line: ports.append(
            urlsplit(line.split(" at ")[1].split()[0]).port))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2)


def test_the_select_command_writes_only_the_chosen_names_to_stdout(monkeypatch, capsys):
    from deltatune.cli import main
    from deltatune.cli import select as command

    original = command.select_modules

    def call(announce):  # the command, with the URL also handed to the test
        monkeypatch.setattr(command, "select_modules", lambda *a, **k: original(*a, announce=announce, **k))
        return main(["select", "minilm-l6"])

    running = Running(call)
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert running.post("/api/submit", {"modules": names})[0] == 200
    assert running.result() == 0
    assert json.loads(capsys.readouterr().out) == names  # `deltatune select MODEL > mods.json` gives JSON
