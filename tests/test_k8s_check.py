"""`fusion k8s check`, what `helm test` runs in the cluster: the spec parses and the store is
reachable and writable with the pods' credentials."""

from __future__ import annotations

import pytest
import yaml

from fusion.cli import main
from fusion.errors import BAD_INPUT_EXIT_CODE
from tests.k8s_sim import s3_server
from tests.s3 import S3_BACKENDS


def write_spec(path, store: str):
    spec = {
        "name": "check",
        "store": store,
        "models": {"target": {"name": "t", "path": "/models/t"}, "sources": [{"name": "s", "path": "/models/s"}]},
        "corpus": {"path": "/data/corpus.jsonl"},
    }
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("backend", S3_BACKENDS)
def test_a_reachable_store_passes_and_keeps_nothing(tmp_path, monkeypatch, capsys, backend):
    with s3_server("runs", backend=backend) as (url, client):
        for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        assert main(["k8s", "check", write_spec(tmp_path / "run.yaml", "s3://runs/check")]) == 0
        assert client.list_objects_v2(Bucket="runs").get("KeyCount", 0) == 0, "the probe is removed"
    out = capsys.readouterr().out
    assert "store s3://runs/check: reachable and writable" in out and "not been prepared yet" in out


@pytest.mark.parametrize("backend", S3_BACKENDS)
def test_a_missing_bucket_fails_naming_the_store(tmp_path, monkeypatch, capsys, backend):
    with s3_server("runs", backend=backend) as (url, _):
        for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        assert main(["k8s", "check", write_spec(tmp_path / "run.yaml", "s3://no-such-bucket/check")]) == BAD_INPUT_EXIT_CODE
    assert "store s3://no-such-bucket/check is not usable from this pod" in capsys.readouterr().err


def test_a_prepared_run_shows_its_status(tmp_path, capsys):
    from fusion.config import parse_spec
    from fusion.run import RUN_RECORD
    from fusion.store import Store

    store = tmp_path / "store"
    spec_path = write_spec(tmp_path / "run.yaml", str(store))
    spec = parse_spec(yaml.safe_load(open(spec_path)))
    Store(str(store)).write_json(RUN_RECORD, {"spec": spec.model_dump(mode="json", by_alias=True)})
    assert main(["k8s", "check", spec_path]) == 0
    assert "run check at file://" in capsys.readouterr().out
