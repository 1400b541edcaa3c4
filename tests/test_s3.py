"""s3:// run stores: endpoint, region and credentials from the spec (by name) or the AWS
environment; secrets never reach run.json, status output or reprs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from fusion.cli import main
from fusion.config import StoreOptionsSpec, parse_spec
from fusion.errors import FusionError
from fusion.pipeline import open_run
from fusion.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def named_credentials(monkeypatch):
    """The server's credentials under other names (SeaweedFS checks them; moto does not)."""
    monkeypatch.setenv("FUSION_TEST_KEY_ID", os.environ["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("FUSION_TEST_SECRET", os.environ["AWS_SECRET_ACCESS_KEY"])
    return {"access_key_id_env": "FUSION_TEST_KEY_ID", "secret_access_key_env": "FUSION_TEST_SECRET"}


def test_credentials_by_name_never_written(micro, s3_endpoint, s3_bucket, named_credentials, capsys):
    spec = micro.spec(f"s3://{s3_bucket}/run")
    spec["store_options"] = {"endpoint_url": s3_endpoint, "region": "us-east-1", **named_credentials}
    run = open_run(parse_spec(spec))
    run.pipeline.write_record()
    assert run.store.fs.key == os.environ["AWS_ACCESS_KEY_ID"]  # the values were used ...
    record = run.store.read_json("run.json")
    assert record["spec"]["store_options"]["secret_access_key_env"] == "FUSION_TEST_SECRET"
    everything = b"".join(run.store.fs.cat_file(p) for p in run.store.fs.find(run.store.path("")))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret.encode() not in everything  # ... but never stored
    assert secret not in repr(run.store) + repr(run.spec)
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made with the same (no) arguments
    try:
        assert main(["status", f"s3://{s3_bucket}/run", "--json"]) == 0
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    out = capsys.readouterr().out
    assert secret not in out and json.loads(out)["store"] == f"s3://{s3_bucket}/run"


def test_missing_credential_variable_is_named(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    options = StoreOptionsSpec(
        endpoint_url=s3_endpoint, access_key_id_env="AWS_ACCESS_KEY_ID", secret_access_key_env="NO_SUCH_SECRET"
    )
    with pytest.raises(FusionError, match="secret_access_key_env: environment variable NO_SUCH_SECRET is not set"):
        Store(f"s3://{s3_bucket}/run", options)


def test_secret_values_are_not_accepted_as_names(micro):
    spec = micro.spec("s3://bucket/run")
    spec["store_options"] = {"access_key_id_env": "AKIA", "secret_access_key_env": "wJalr/K7MDENG+bPxRfiCY"}
    with pytest.raises(FusionError, match="key 'store_options.secret_access_key_env'"):
        parse_spec(spec)
    spec["store_options"] = {"access_key_id_env": "KEY_ID"}
    with pytest.raises(FusionError, match="go together"):
        parse_spec(spec)


def test_environment_alone_reaches_the_store(s3_endpoint, s3_bucket):
    """No store_options: endpoint and credentials from AWS_* variables (a fresh process)."""
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    code = (
        "from fusion.store import Store; s = Store('s3://%s/env');"
        "assert s.create('a.json', b'1') and not s.create('a.json', b'2'); print(s.read_bytes('a.json'))" % s3_bucket
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "b'1'", out.stderr[-2000:]
