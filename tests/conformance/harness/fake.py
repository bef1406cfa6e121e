"""In-process HTTP servers for the harness: a scriptable fake Inngest API, and a recording proxy.

Both run on a background thread (stdlib ThreadingHTTPServer) and record every exchange.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

import httpx


@dataclass
class Exchange:
    method: str
    path: str
    query: str
    headers: dict
    body: bytes
    status: int = 0
    resp_headers: dict = field(default_factory=dict)
    resp_body: bytes = b""

    def json(self):
        return json.loads(self.body) if self.body else None

    def resp_json(self):
        return json.loads(self.resp_body) if self.resp_body else None


Route = Callable[[Exchange], tuple[int, dict, bytes]]


class _Server:
    def __init__(self, handler_cls):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeInngest(_Server):
    """A fake Inngest API. `routes` maps (METHOD, path-prefix) to a function returning
    (status, headers, body). Unrouted requests get 404. Everything is recorded."""

    def __init__(self, routes: dict[tuple[str, str], Route] | None = None):
        self.routes = dict(routes or {})
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                parts = urlsplit(self.path)
                ex = Exchange(self.command, parts.path, parts.query,
                              {k.lower(): v for k, v in self.headers.items()}, body)
                route = None
                for (m, prefix), fn in outer.routes.items():
                    if m == self.command and parts.path.startswith(prefix):
                        route = fn
                        break
                if route is None:
                    status, headers, resp = 404, {"content-type": "application/json"}, b'{"error":"no route"}'
                else:
                    status, headers, resp = route(ex)
                ex.status, ex.resp_headers, ex.resp_body = status, headers, resp
                with outer.lock:
                    outer.exchanges.append(ex)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        super().__init__(H)

    def find(self, method: str, prefix: str) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.method == method and e.path.startswith(prefix)]


def json_route(status: int, obj) -> Route:
    body = json.dumps(obj).encode()
    return lambda ex: (status, {"content-type": "application/json"}, body)


class RecordingProxy(_Server):
    """Forwards every request to `target` (an origin like http://127.0.0.1:PORT) and records
    both halves. Put its URL where the server would call the app to see the exact wire."""

    def __init__(self, target: str, timeout: float = 120, set_headers: dict | None = None):
        """`set_headers` overrides request headers on the way through (e.g. Authorization).
        The Host header is passed through unchanged, so an app PUT through the proxy
        registers the proxy's URL and every later call from the server comes through it."""
        self.target = target.rstrip("/")
        self.set_headers = {k.lower(): v for k, v in (set_headers or {}).items()}
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        client = httpx.Client(timeout=timeout)
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                parts = urlsplit(self.path)
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("content-length", "connection")
                        and k.lower() not in outer.set_headers}
                hdrs.update(outer.set_headers)
                ex = Exchange(self.command, parts.path, parts.query,
                              {k.lower(): v for k, v in self.headers.items()}, body)
                try:
                    r = client.request(self.command, outer.target + self.path, content=body, headers=hdrs)
                    status, rh, rb = r.status_code, dict(r.headers), r.content
                except httpx.HTTPError as e:
                    status, rh, rb = 502, {}, f"proxy error: {e!r}".encode()
                ex.status, ex.resp_headers, ex.resp_body = status, {k.lower(): v for k, v in rh.items()}, rb
                with outer.lock:
                    outer.exchanges.append(ex)
                self.send_response(status)
                for k, v in rh.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(rb)))
                self.end_headers()
                self.wfile.write(rb)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        super().__init__(H)

    def calls(self) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.method == "POST"]
