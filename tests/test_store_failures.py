"""Every storage failure a user can cause: one line naming the store, exit 3 for a store that
cannot be used as given, the retryable exit code for one that does not answer; nothing left
behind that a later run would take for committed output."""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import s3fs
import yaml

from fusion import shards
from fusion.cli import main
from fusion.config import StoreOptionsSpec
from fusion.errors import BAD_INPUT_EXIT_CODE, STORE_UNREACHABLE_EXIT_CODE, FusionError, StoreUnreachable
from fusion.store import Store
from tests.s3 import free_ports


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_naming(err: str, store: str, *needles: str) -> None:
    assert err.startswith("fusion: error: ") and "\n" not in err, err
    assert f"store {store}" in err, err
    for needle in needles:
        assert needle in err, err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def tmpfs(tmp_path):
    """A tiny tmpfs (mount needs root and CAP_SYS_ADMIN: skipped where it cannot be mounted);
    yields (folder, remount) where remount(options) changes its size or makes it read-only."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)

    try:
        yield folder, remount
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---- local stores --------------------------------------------------------------------------------
def test_store_under_proc(micro, tmp_path, capsys):
    spec = micro.write_spec(tmp_path / "spec.yaml", "/proc/fusion-test/run")
    code, err = cli(capsys, "prepare", spec)
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, "file:///proc/fusion-test/run", "cannot")


def test_permission_denied(micro, tmp_path, monkeypatch, capsys):
    """A folder the user may not write in (EACCES, injected: root ignores permission bits)."""
    store = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = cli(capsys, "prepare", micro.write_spec(tmp_path / "spec.yaml", store))
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"file://{store}", "permission denied")
    assert not store.exists()


def test_store_through_a_file(micro, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    spec = micro.write_spec(tmp_path / "spec.yaml", tmp_path / "notes.txt" / "run")
    code, err = cli(capsys, "prepare", spec)
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"file://{tmp_path}/notes.txt/run", "is a file, not a folder")


def test_read_only_filesystem(micro, tmp_path, tmpfs, capsys):
    folder, remount = tmpfs
    remount("ro")
    spec = micro.write_spec(tmp_path / "spec.yaml", folder / "run")
    code, err = cli(capsys, "prepare", spec)
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"file://{folder}/run", "read-only")


def test_full_disk_then_room_again(micro, tmp_path, tmpfs, capsys):
    """A split that fills a 48 KiB tmpfs stops with one line; no temporary file is left; with
    room again the same command completes, as if the first had never run."""
    folder, remount = tmpfs
    spec = micro.write_spec(tmp_path / "spec.yaml", folder / "run", **{"split.shard_blocks": 8})
    code, err = cli(capsys, "run", spec, "--stages", "split")
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"file://{folder}/run", "no space left on the device")
    assert not [p for p in files_under(folder) if ".tmp-" in p.name], files_under(folder)
    remount("size=8m")
    code, err = cli(capsys, "run", spec, "--stages", "split")
    assert code == 0, err
    reference = micro.write_spec(tmp_path / "ref.yaml", tmp_path / "ref", **{"split.shard_blocks": 8})
    assert cli(capsys, "run", reference, "--stages", "split")[0] == 0
    ours = {p.relative_to(folder / "run"): p.read_bytes() for p in files_under(folder / "run" / "split")}
    theirs = {p.relative_to(tmp_path / "ref"): p.read_bytes() for p in files_under(tmp_path / "ref" / "split")}
    assert ours == theirs


def test_full_disk_without_a_tmpfs(tmp_path, monkeypatch):
    """ENOSPC from the disk (injected into fsync where no tmpfs can be mounted): one error naming
    the store, and the temporary file is removed."""
    store = Store(str(tmp_path / "run"))
    store.write_bytes("a.json", b"{}")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FusionError, match=r"store file://.*/run: cannot create b.json: no space left on the device"):
        store.create("b.json", b"{}")
    with pytest.raises(FusionError, match="cannot write a.json: no space left"):
        store.write_bytes("a.json", b"{1}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["a.json"]


def test_committing_a_part_sweeps_temporaries_a_killed_writer_left(tmp_path):
    """`*.tmp-*` files older than an hour under the part are removed at its commit; a younger one
    (a concurrent writer's) and those of other parts stay."""
    store = Store(str(tmp_path / "run"))
    record = shards.write_shard(store, "logits", "m", 0, {"ids": np.arange(10, dtype=np.int32)}, "abc", rows=10)
    part = tmp_path / "run" / "logits" / "m"
    old = [part / "shard-00001.json.tmp-dead", part / record["path"] / "ids" / "zarr.json.tmp-dead"]
    young = part / "shard-00001.json.tmp-live"
    elsewhere = tmp_path / "run" / "logits" / "other" / "shard-00000.json.tmp-dead"
    two_hours_ago = time.time() - 7200
    for f in [*old, young, elsewhere]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a write")
        if f is not young:
            os.utime(f, (two_hours_ago, two_hours_ago))
    shards.commit_part(store, "logits", "m", 1, "abc")
    assert shards.is_part_committed(store, "logits", "m", "abc")
    assert not any(f.exists() for f in old)
    assert young.exists() and elsewhere.exists()
    assert shards.read_shard(store, "logits", "m", 0)["ids"].tolist() == list(range(10))


# ---- S3 stores -----------------------------------------------------------------------------------
def s3_spec(micro, tmp_path, store: str, endpoint: str, **options) -> Path:
    spec = micro.spec(store)
    spec["store_options"] = {"endpoint_url": endpoint, "connect_timeout": 1, "read_timeout": 2, "max_attempts": 2, **options}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_missing_bucket(micro, tmp_path, s3_endpoint, capsys):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    code, err = cli(capsys, "prepare", s3_spec(micro, tmp_path, f"s3://{bucket}/run", s3_endpoint))
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"s3://{bucket}/run", f"bucket {bucket} does not exist")


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials(micro, tmp_path, s3_backend, s3_endpoint, s3_bucket, monkeypatch, capsys, wrong):
    if s3_backend == "moto":
        pytest.skip("moto accepts any credentials")
    monkeypatch.setenv("FUSION_KEY", "no-such-key" if wrong == "key" else os.environ["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("FUSION_SECRET", "wrong-secret" if wrong == "secret" else os.environ["AWS_SECRET_ACCESS_KEY"])
    names = {"access_key_id_env": "FUSION_KEY", "secret_access_key_env": "FUSION_SECRET"}
    s3fs.S3FileSystem.clear_instance_cache()
    code, err = cli(capsys, "prepare", s3_spec(micro, tmp_path, f"s3://{s3_bucket}/run", s3_endpoint, **names))
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, f"s3://{s3_bucket}/run", "access refused", "check the credentials")
    assert "wrong-secret" not in err


def test_unreachable_endpoint_exits_to_be_retried(micro, tmp_path, capsys):
    """Nothing listens at the endpoint: the run waits store_options.outage_seconds, logging, then
    exits with the retryable code, naming the store."""
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    spec = s3_spec(micro, tmp_path, "s3://runs/run", endpoint, outage_seconds=3)
    code, err = cli(capsys, "prepare", spec)
    assert code == STORE_UNREACHABLE_EXIT_CODE != BAD_INPUT_EXIT_CODE
    lines = err.splitlines()
    assert lines[0].startswith("[fusion] store s3://runs/run: unreachable (EndpointConnectionError"), err
    assert lines[-1].startswith("fusion: error: store s3://runs/run: unreachable for "), err
    assert "nothing is lost" in lines[-1]


def test_no_credentials_at_all(micro, tmp_path, monkeypatch, capsys):
    """No keys in the environment or store_options, no credentials file, no instance metadata:
    refused before any request is sent (nothing listens at the endpoint)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    code, err = cli(capsys, "prepare", s3_spec(micro, tmp_path, "s3://runs/run", endpoint, outage_seconds=3))
    assert code == BAD_INPUT_EXIT_CODE
    one_line_naming(err, "s3://runs/run", "no usable credentials")


def test_unreachable_store_in_process_raises_its_own_error():
    store = Store("s3://runs/run", StoreOptionsSpec(endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}",
                                                   connect_timeout=1, max_attempts=1, outage_seconds=1))
    with pytest.raises(StoreUnreachable, match="unreachable") as caught:
        store.read_bytes("run.json")
    assert caught.value.exit_code == STORE_UNREACHABLE_EXIT_CODE
