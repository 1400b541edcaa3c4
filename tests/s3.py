"""An S3 server for tests (moto's, on 127.0.0.1, port 0) and a proxy in front of it that
makes a share of requests fail or time out, as real object stores sometimes do.

The proxy's faults, each drawn with its share of `rate`:
- refuse:  answer 503 SlowDown without forwarding (the request had no effect)
- lose:    forward, then answer 500 InternalError (the request took effect, the client
           does not know: a retried conditional PUT then meets its own object)
- stall:   forward, then send nothing for `stall_seconds` and close (the client times out)
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERROR_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'


def start_moto():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


class FaultyProxy:
    def __init__(self, upstream: str, rate: float, seed: int = 0, stall_seconds: float = 3.0):
        self.upstream = upstream.removeprefix("http://")
        self.rate, self.stall_seconds = rate, stall_seconds
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"requests": 0, "refuse": 0, "lose": 0, "stall": 0}
        self.writes: list[tuple[str, str, int]] = []  # (method, path, upstream status) of PUT/DELETE
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                try:
                    proxy.handle(self)
                except ConnectionError:  # the client gave up (its timeout) while we answered
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if not self.enabled or self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(["refuse", "lose", "stall"])
            self.counts[fault] += 1
            return fault

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        fault = self._draw()
        if fault == "refuse":
            return _reply(h, 503, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", b"SlowDown"))
        status, headers, payload = self._forward(h, body)
        if h.command in ("PUT", "DELETE"):
            with self.lock:
                self.writes.append((h.command, h.path.split("?")[0], status))
        if fault == "lose":
            return _reply(h, 500, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", b"InternalError"))
        if fault == "stall":
            time.sleep(self.stall_seconds)
            h.close_connection = True
            return
        _reply(h, status, headers, payload, head=h.command == "HEAD")

    def _forward(self, h, body: bytes):
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
            if h.command == "HEAD":
                out["Content-Length"] = resp.getheader("Content-Length", "0")
            return resp.status, out, payload
        finally:
            conn.close()


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def _reply(h, status: int, headers: dict, payload: bytes, head: bool = False) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    if not head:
        h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    if not head and payload:
        h.wfile.write(payload)
