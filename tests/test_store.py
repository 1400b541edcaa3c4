import json

import numpy as np
import pytest

from fusion import shards
from fusion.errors import FusionError
from fusion.store import Store
from tests.s3 import S3_BACKENDS, FaultyProxy, options_for, s3_store


@pytest.fixture(params=["file", "memory", *S3_BACKENDS])
def store(request, tmp_path):
    if request.param == "file":
        yield Store(str(tmp_path / "run"))
    elif request.param == "memory":
        s = Store(f"memory://test-{tmp_path.name}")
        yield s
        s.remove("")
    else:
        yield s3_store(request, request.param)


def arrays():
    rng = np.random.default_rng(0)
    return {
        "ids": rng.integers(0, 30000, size=(100, 10)).astype(np.uint16),
        "logprobs": rng.normal(size=(100, 10)).astype(np.float16),
        "ptr": np.array([0, 40, 100], dtype=np.int64),
    }


def test_roundtrip_and_status(store):
    record = shards.write_shard(store, "logits", "m", 3, arrays(), "abc", rows=100)
    assert record["rows"] == 100 and record["stored_bytes"] > 0
    back = shards.read_shard(store, "logits", "m", 3)
    for name, a in arrays().items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a)
    status = shards.part_status(store, "logits", "m")
    assert (status.committed, status.rows, status.complete) == (1, 100, False)


def test_same_arrays_give_the_same_bytes(store):
    first = shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    store.remove(shards.record_path("logits", "m", 0))
    again = shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    assert again == first  # content-addressed folder, deterministic encoding


def test_arrays_without_record_are_not_committed(store):
    shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    store.remove(shards.record_path("logits", "m", 0))  # as if killed before the record
    assert shards.read_record(store, "logits", "m", 0) is None
    with pytest.raises(FusionError, match="not committed"):
        shards.read_shard(store, "logits", "m", 0)


def test_other_config_hash_is_an_error(store):
    shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    assert shards.read_record(store, "logits", "m", 0, "abc") is not None
    with pytest.raises(FusionError, match="config hash abc"):
        shards.read_record(store, "logits", "m", 0, "xyz")
    with pytest.raises(FusionError, match="shard-00000.json was written with config hash abc"):
        shards.write_shard(store, "logits", "m", 0, arrays(), "xyz", rows=100)


def test_second_writer_keeps_the_first_record(store):
    first = shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    other = {**arrays(), "ptr": np.array([0, 50, 100], dtype=np.int64)}  # a nondeterministic twin
    kept = shards.write_shard(store, "logits", "m", 0, other, "abc", rows=100)
    assert kept == first
    assert np.array_equal(shards.read_shard(store, "logits", "m", 0)["ptr"], arrays()["ptr"])


def test_commit_part_needs_every_shard_and_removes_stray_folders(store):
    shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    with pytest.raises(FusionError, match="shard-00001 is not committed"):
        shards.commit_part(store, "logits", "m", 2, "abc")
    shards.write_shard(store, "logits", "m", 1, arrays(), "abc", rows=100)
    stray = shards.write_shard(store, "logits", "m", 1, {**arrays(), "ptr": np.zeros(3, np.int64)}, "abc", rows=1)
    assert stray["rows"] == 100  # the first record holds
    folders = [n for n in store.list("logits/m") if n.endswith(".zarr")]
    assert len(folders) == 3  # shards 0 and 1, and the outraced twin of 1
    shards.commit_part(store, "logits", "m", 2, "abc")
    assert shards.is_part_committed(store, "logits", "m", "abc")
    status = shards.part_status(store, "logits", "m")
    assert status.complete and status.rows == 200
    def holds_objects(folder: str) -> bool:
        return any(i["type"] == "file" for i in store.fs.find(store.path(folder), detail=True).values())

    holding_objects = [n for n in store.list("logits/m") if n.endswith(".zarr") and holds_objects(f"logits/m/{n}")]
    assert sorted(holding_objects) == sorted({shards.read_record(store, "logits", "m", i)["path"] for i in (0, 1)})
    # (SeaweedFS may still list an emptied folder: nothing relies on a listed folder holding objects)


def test_create_writes_once(store):
    assert store.create("x/lease.json", b"a")
    assert not store.create("x/lease.json", b"b")
    assert store.create("x/lease.json", b"a")  # holds exactly this: a retried create of our own
    assert store.read_bytes("x/lease.json") == b"a"
    assert store.write_json("x/y.json", {"a": 1}, exclusive=True)
    assert json.loads(store.read_bytes("x/y.json")) == {"a": 1}


def test_files_shard_roundtrip(store, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    shards.write_files_shard(store, "train", "model", 0, folder, "abc")
    out = shards.read_files_shard(store, "train", "model", 0, tmp_path / "copy")
    assert (out / "a.txt").read_text() == "hello"


def test_racing_creates_give_one_winner(store):
    """Eight threads create one record at once: exactly one writes it, the others see it exists."""
    import threading

    barrier = threading.Barrier(8)
    results: dict[int, bool | BaseException] = {}

    def create(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.create("race/_COMMITTED.json", json.dumps({"writer": i}).encode())
        except BaseException as e:  # noqa: BLE001 - the test reports what each thread got
            results[i] = e

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, bool) for r in results.values()), results
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1 and json.loads(store.read_bytes("race/_COMMITTED.json")) == {"writer": winners[0]}


def test_create_retries_a_conflict(s3_endpoint, s3_bucket):
    """409 ConditionalRequestConflict (a concurrent conditional write was in flight) is tried
    again; the outcome is then written, or exists."""
    proxy = FaultyProxy(s3_endpoint, rate=0.0)
    try:
        store = Store(f"s3://{s3_bucket}/run", options_for(proxy.url))
        proxy.conflicts = 3
        assert store.create("a.json", b"1")
        proxy.conflicts = 2
        assert not store.create("a.json", b"2")
        assert proxy.conflicts == 0 and store.read_bytes("a.json") == b"1"
    finally:
        proxy.stop()


def test_create_waits_out_a_long_run_of_conflicts(s3_endpoint, s3_bucket):
    """More 409s in a row than the quick retries: a busy server, waited out like an outage
    (not refused as bad input); the write then lands once."""
    from fusion.store import CONFLICT_RETRIES

    proxy = FaultyProxy(s3_endpoint, rate=0.0)
    try:
        store = Store(f"s3://{s3_bucket}/run", options_for(proxy.url))
        proxy.conflicts = CONFLICT_RETRIES + 3
        assert store.create("b.json", b"1")
        assert proxy.conflicts == 0 and store.read_bytes("b.json") == b"1"
    finally:
        proxy.stop()
