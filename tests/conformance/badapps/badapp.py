"""Apps that are not well-behaved SDKs, for the bad-input cases (stdlib only).

One process serves every behaviour, chosen by the first path segment of the call URL:

  /nosdk/...     200 with an HTML page and no X-Inngest-SDK header (a proxy or error page)
  /notfound/...  404 with an HTML body
  /hang/...      accepts the request and never answers (until HANG_SECONDS, default 900)
  /badjson/...   206 with SDK headers but a body that is not JSON
  /badjson200/.. 200 with SDK headers but a body that is not JSON

GET /calls answers {"<behaviour>": <number of POSTs received>}.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANG_SECONDS = float(os.environ.get("HANG_SECONDS", "900"))
calls: dict[str, int] = {}
lock = threading.Lock()

SDK_HEADERS = {
    "X-Inngest-SDK": "inngest-js:v3.52.4",
    "X-Inngest-Req-Version": "1",
    "Content-Type": "application/json",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/calls":
            with lock:
                body = json.dumps(calls).encode()
            return self._send(200, body, {"Content-Type": "application/json"})
        return self._send(200, b"<html>not an SDK</html>", {"Content-Type": "text/html"})

    def do_PUT(self):
        self._drain()
        return self._send(200, b"<html>not an SDK</html>", {"Content-Type": "text/html"})

    def _drain(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)

    def do_POST(self):
        self._drain()
        kind = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        with lock:
            calls[kind] = calls.get(kind, 0) + 1
        if kind == "nosdk":
            return self._send(200, b"<html>hi</html>", {"Content-Type": "text/html"})
        if kind == "notfound":
            return self._send(404, b"<html>404 page not found</html>", {"Content-Type": "text/html"})
        if kind == "hang":
            time.sleep(HANG_SECONDS)
            return self._send(200, b'"too late"', SDK_HEADERS)
        if kind == "badjson":
            return self._send(206, b'[{"op": "StepRun", "id": ', SDK_HEADERS)
        if kind == "badjson200":
            return self._send(200, b"{not json", SDK_HEADERS)
        return self._send(400, b"unknown behaviour", {"Content-Type": "text/plain"})


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "3000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"bad app on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()
