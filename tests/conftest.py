"""Shared fixtures: environment, the ../shared assets, and a micro fusion run that builds in
seconds (three small models of two architectures and two tokenizer families)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


# ---- S3: moto's server on 127.0.0.1, one bucket per test ------------------------------------------
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "fusion-test-key",
    "AWS_SECRET_ACCESS_KEY": "fusion-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint URL of an S3 server (moto) for this test session; credentials in the env."""
    pytest.importorskip("s3fs")
    from tests.s3 import start_moto

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server, url = start_moto()
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 10000}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)  # no LocationConstraint: moto wants none for us-east-1
    return name


@pytest.fixture
def s3_options(s3_endpoint):
    from fusion.config import StoreOptionsSpec

    return StoreOptionsSpec(endpoint_url=s3_endpoint, connect_timeout=2, read_timeout=5, max_attempts=6)
