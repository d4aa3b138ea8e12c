"""The selector's HTTP server: loopback only, a random per-session token, four routes.

``GET /?token=T`` serves the page; the ``POST`` routes of ``api`` need the token in the ``X-Deltatune-Token``
header; once the final route has answered, :attr:`SelectorServer.finished` is set.  Anything else, a wrong token, or a ``Host`` other than the loopback address the
server listens on (a DNS-rebinding page) gets an error status.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"
MAX_BODY = 1 << 20


class SelectorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, page: Callable[[str], str], api: dict[str, Callable[[dict], dict]], port: int = 0,
                 final_route: str = "/api/submit") -> None:
        super().__init__((LOOPBACK, port), _Handler)
        self.token = secrets.token_urlsafe(24)
        self.page = page(self.token)
        self.api, self.final_route = api, final_route
        self.lock = threading.Lock()  # one request at a time touches the model
        self.finished = threading.Event()  # set once the final route has answered
        self.hosts = {f"{LOOPBACK}:{self.server_port}", f"localhost:{self.server_port}"}
        self.thread = threading.Thread(target=self.serve_forever, name="deltatune-selector", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_port}/?token={self.token}"

    def start(self) -> SelectorServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    server: SelectorServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the terminal for the URL
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                         "connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _host_ok(self) -> bool:
        if self.headers.get("Host") in self.server.hosts:
            return True
        self._json(403, {"error": "unknown host"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path != "/":
            self._json(404, {"error": "no such route"})
        elif not self.server.token_ok(parse_qs(url.query).get("token", [None])[0]):
            self._json(403, {"error": "missing or wrong token"})
        else:
            self._send(200, self.server.page.encode(), "text/html; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        handler = self.server.api.get(urlsplit(self.path).path)
        if handler is None:
            self._json(404, {"error": "no such route"})
            return
        if not self.server.token_ok(self.headers.get("X-Deltatune-Token")):
            self._json(403, {"error": "missing or wrong token"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": "request too large"})
            return
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
            with self.server.lock:
                answer = handler(request)
        except Exception as error:  # noqa: BLE001 - the page shows why a selection cannot be built
            self._json(400, {"error": str(error)})
            return
        self._json(200, answer)
        if urlsplit(self.path).path == self.server.final_route:
            self.server.finished.set()
