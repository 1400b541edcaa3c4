"""Damaged shards are errors that name the object, never silently wrong data (local and S3)."""

import json

import numpy as np
import pytest

from fusion import shards
from fusion.errors import FusionError
from fusion.store import Store
from tests.s3 import S3_BACKENDS, s3_store


@pytest.fixture(params=["file", *S3_BACKENDS])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "run"))
    return s3_store(request, request.param)


@pytest.fixture
def shard(store):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50000, size=(2000, 10)).astype(np.uint16)
    arrays = {"ids": ids, "tail": rng.random(2000).astype(np.float16)}
    record = shards.write_shard(store, "logits", "m", 0, arrays, "abc", rows=2000)
    return f"logits/m/{record['path']}"


def read(store):
    return shards.read_shard(store, "logits", "m", 0)


def test_corrupted_chunk(store, shard):
    blob = bytearray(store.read_bytes(f"{shard}/ids/c/0/0"))
    blob[len(blob) // 2] ^= 0x5A  # same size, different bytes
    store.write_bytes(f"{shard}/ids/c/0/0", bytes(blob))
    with pytest.raises(FusionError, match=r"shard-00000\.[0-9a-f]+\.zarr/ids: cannot be read .*(?i:crc32c|checksum)"):
        read(store)


def test_chunk_rewritten_with_other_valid_data(store, shard):
    other = np.ones((2000, 10), dtype=np.uint16)
    group_objects = shards.encode_group({"ids": other})
    store.write_bytes(f"{shard}/ids/c/0/0", group_objects["ids/c/0/0"])
    changed = r"\.zarr/ids/c/0/0: \d+ bytes but the record says|\.zarr/ids: checksum differs"
    with pytest.raises(FusionError, match=changed):
        read(store)


def test_truncated_chunk(store, shard):
    blob = store.read_bytes(f"{shard}/tail/c/0")
    store.write_bytes(f"{shard}/tail/c/0", blob[: len(blob) // 2])
    with pytest.raises(FusionError, match=r"\.zarr/tail/c/0: \d+ bytes but the record says \d+ \(truncated"):
        read(store)


def test_truncated_record(store, shard):
    rel = shards.record_path("logits", "m", 0)
    blob = store.read_bytes(rel)
    store.write_bytes(rel, blob[: len(blob) // 2])
    with pytest.raises(FusionError, match=r"logits/m/shard-00000\.json: not valid JSON"):
        read(store)


def test_record_without_its_fields(store, shard):
    rel = shards.record_path("logits", "m", 0)
    record = json.loads(store.read_bytes(rel))
    del record["objects"]
    store.write_json(rel, record)
    with pytest.raises(FusionError, match=r"shard-00000\.json: commit record lacks its 'objects'"):
        read(store)


def test_missing_shard(store, shard):
    with pytest.raises(FusionError, match=r"logits/m/shard-00001\.json: shard not committed"):
        shards.read_shard(store, "logits", "m", 1)
    with pytest.raises(FusionError, match="shard-00001 is not committed"):
        shards.commit_part(store, "logits", "m", 2, "abc")


def test_missing_object(store, shard):
    store.remove(f"{shard}/ids/c/0/0")
    with pytest.raises(FusionError, match=r"\.zarr/ids/c/0/0: missing \(listed in the shard's record\)"):
        read(store)
    store.remove(shard)
    with pytest.raises(FusionError, match=r"\.zarr/(ids|tail)/.*: missing"):
        read(store)


def test_wrong_dtype(store, shard):
    meta = json.loads(store.read_bytes(f"{shard}/ids/zarr.json"))
    meta["data_type"] = "int16"  # same size: the chunk still decodes, to other numbers
    blob = json.dumps(meta).encode()
    store.write_bytes(f"{shard}/ids/zarr.json", blob)
    rel = shards.record_path("logits", "m", 0)
    record = json.loads(store.read_bytes(rel))
    record["objects"]["ids/zarr.json"] = len(blob)  # even with a record that agrees on sizes
    store.write_json(rel, record)
    with pytest.raises(FusionError, match=r"\.zarr/ids: int16\[2000, 10\] but the record says uint16\[2000, 10\]"):
        read(store)


def test_wrong_shape(store, shard):
    meta = json.loads(store.read_bytes(f"{shard}/tail/zarr.json"))
    meta["shape"] = [1000]
    blob = json.dumps(meta).encode()
    store.write_bytes(f"{shard}/tail/zarr.json", blob)
    rel = shards.record_path("logits", "m", 0)
    record = json.loads(store.read_bytes(rel))
    record["objects"]["tail/zarr.json"] = len(blob)
    store.write_json(rel, record)
    wrong = r"\.zarr/tail: (float16\[1000\] but the record says float16\[2000\]|cannot be read)"
    with pytest.raises(FusionError, match=wrong):
        read(store)


def test_unknown_array(store, shard):
    with pytest.raises(FusionError, match="no array 'nll' in its record"):
        shards.read_shard(store, "logits", "m", 0, ["nll"])
