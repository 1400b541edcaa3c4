import numpy as np
import pytest

from fusion import shards
from fusion.errors import FusionError
from fusion.store import Store


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield Store(str(tmp_path / "run"))
        return
    s = Store(f"memory://test-{tmp_path.name}")
    yield s
    s.remove("")


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


def test_corrupt_array_is_detected(store):
    shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    group = store.open_group(shards.array_path("logits", "m", 0), mode="a")
    group["ids"][0, 0] = 7  # rewrites a chunk behind the record's back
    with pytest.raises(FusionError, match="ids: checksum differs"):
        shards.read_shard(store, "logits", "m", 0)


def test_commit_part_needs_every_shard(store):
    shards.write_shard(store, "logits", "m", 0, arrays(), "abc", rows=100)
    with pytest.raises(FusionError, match="shard-00001 is not committed"):
        shards.commit_part(store, "logits", "m", 2, "abc")
    shards.write_shard(store, "logits", "m", 1, arrays(), "abc", rows=100)
    shards.commit_part(store, "logits", "m", 2, "abc")
    assert shards.is_part_committed(store, "logits", "m", "abc")
    assert shards.part_status(store, "logits", "m").complete


def test_exclusive_write_creates_once(store):
    assert store.write_json("x/lease.json", {"a": 1}, exclusive=True)
    assert not store.write_json("x/lease.json", {"a": 2}, exclusive=True)
    assert store.read_json("x/lease.json") == {"a": 1}


def test_files_shard_roundtrip(store, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    shards.write_files_shard(store, "train", "model", 0, folder, "abc")
    out = shards.read_files_shard(store, "train", "model", 0, tmp_path / "copy")
    assert (out / "a.txt").read_text() == "hello"
