"""The training-side reader: the same tensors and order as the trainer's in-memory path
(fusion/training/data.py),
sharded across ranks, resumable, streaming from local or S3 stores."""

import numpy as np
import pytest
import torch

from fusion import shards
from fusion.errors import FusionError
from fusion.reader import PackedReader, epoch_order
from fusion.sparse import SparseRows, concat
from fusion.stages import fuse
from fusion.store import Store
from fusion.training import data
from tests.s3 import S3_BACKENDS, s3_store

BOS, PAD, VOCAB = 1, 0, 3000


def synthetic_shard(seed: int, blocks: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, size=blocks)
    ptr = np.zeros(blocks + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    tokens = rng.integers(3, VOCAB, size=int(ptr[-1]))
    counts = rng.integers(0, 9, size=len(tokens))
    ids, lps = [], []
    for r, c in enumerate(counts):
        row = rng.choice(VOCAB, size=c, replace=False)
        if c and rng.random() < 0.5:
            row[rng.integers(c)] = tokens[r] if tokens[r] not in row else row[0]
        ids.append(row)
        lps.append(np.sort(-rng.exponential(2, size=c))[::-1])
    as16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731  (values float16 can hold)
    ids = np.concatenate(ids).astype(np.int32)
    rows = SparseRows(counts.astype(np.int32), ids, as16(np.concatenate(lps)), as16(rng.random(len(tokens))))
    return tokens, ptr, rows, rng.integers(0, 3, size=blocks).astype(np.uint8)


@pytest.fixture(params=["file", *S3_BACKENDS])
def packed_store(request, tmp_path):
    """A committed fuse part of 5 shards, and the same data as the trainer holds it in memory."""
    if request.param == "file":
        store = Store(str(tmp_path / "run"))
    else:
        store = s3_store(request, request.param)
    parts = [synthetic_shard(i, 7 + 3 * i) for i in range(5)]
    for i, (tokens, ptr, rows, choice) in enumerate(parts):
        shards.write_shard(store, "fuse", "train", i, fuse.pack(tokens, ptr, rows, choice, VOCAB), "h", rows=rows.rows)
    shards.commit_part(store, "fuse", "train", len(parts), "h")
    lengths = np.concatenate([np.diff(p[1]) for p in parts])
    ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    rows = concat([p[2] for p in parts])
    per_shard = [len(p[1]) - 1 for p in parts]
    packed = data.Packed(
        tokens=np.concatenate([p[0] for p in parts]).astype(np.int64),
        ptr=ptr,
        rows=rows,
        row_ptr=rows.ptr,
        choice=np.concatenate([p[3] for p in parts]).astype(np.int64),
        shard_of=np.repeat(np.arange(len(parts)), per_shard),
        first_of_shard=np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64),
    )
    return store, packed


def trainer_steps(packed, steps: int, batch_size: int, seed: int):
    """The trainer's blocks per step (global indices) in its own reader's order."""
    reader = data.BlockReader(packed, seed, rank=0, world_size=1)
    out = []
    for _ in range(steps):
        blocks = [next(reader) for _ in range(batch_size)]
        index = []
        for b in blocks:
            shard, block = b.where.split("shard-")[1].split(" block ")
            index.append(int(packed.first_of_shard[int(shard)]) + int(block))
        out.append((index, blocks))
    return out


def reader(store, **kw):
    batch_size, seed = kw.pop("batch_size", 6), kw.pop("seed", 3)
    return PackedReader(store, batch_size=batch_size, seed=seed, bos=BOS, pad=PAD, config_hash="h", **kw)


def collated(batch):
    return (batch.inputs, batch.mask, batch.labels, batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail)


def test_same_batches_as_the_trainer(packed_store):
    store, packed = packed_store
    r = reader(store, micro_batch_size=4, prefetch=3)
    steps = 2 * packed.blocks // 6 + 1  # across an epoch boundary
    batches = [next(r) for _ in range(2 * steps)]  # 6 blocks per step: micro-batches of 4 and 2
    r.close()
    for step, (blocks, objects) in enumerate(trainer_steps(packed, steps, 6, 3)):
        for m, (part, objs) in enumerate(((blocks[:4], objects[:4]), (blocks[4:], objects[4:]))):
            got = batches[2 * step + m]
            assert (got.step, got.micro, got.last) == (step, m, m == 1)
            assert got.blocks.tolist() == part
            assert got.step_tokens == int(sum(packed.ptr[b + 1] - packed.ptr[b] for b in blocks))
            assert got.choice.tolist() == packed.choice[part].tolist()
            for a, b in zip(collated(got), collated(data.collate(objs, BOS, PAD, VOCAB, 3))):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_ranks_split_the_global_batch(packed_store):
    store, packed = packed_store
    single = reader(store)
    ranks = [reader(store, rank=r, world_size=3, micro_batch_size=1) for r in range(3)]
    for step in range(4):
        whole = next(single)
        mine = [[next(r) for _ in range(2)] for r in ranks]
        got = sorted(int(b) for rank in mine for batch in rank for b in batch.blocks)
        assert got == sorted(whole.blocks.tolist())
        assert {batch.step_tokens for rank in mine for batch in rank} == {whole.step_tokens}
    for r in [single, *ranks]:
        r.close()


def test_position_saves_and_restores(packed_store):
    store, _ = packed_store
    first = reader(store, micro_batch_size=4)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(6)]
    first.close()
    resumed = reader(store, micro_batch_size=4)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert (got.step, got.micro) == (want.step, want.micro)
        assert all(torch.equal(a, b) for a, b in zip(collated(got), collated(want)))
    resumed.close()
    other = reader(store, seed=4)
    with pytest.raises(FusionError, match="seed is 3 but this reader's is 4"):
        other.load_state_dict(state)


def test_windowed_order_is_a_seeded_permutation():
    lengths = [7, 10, 13, 16, 19]
    a = epoch_order(lengths, 3, 0, window=2)
    assert sorted(a.tolist()) == list(range(sum(lengths)))
    assert np.array_equal(a, epoch_order(lengths, 3, 0, window=2))
    assert not np.array_equal(a, epoch_order(lengths, 3, 1, window=2))
    assert np.array_equal(epoch_order(lengths, 3, 0, None), np.random.default_rng([3, 0]).permutation(sum(lengths)))
    shard = np.repeat(np.arange(5), lengths)[a]  # the shard of each position
    window = np.random.default_rng([3, 0, 1]).permutation(5)[:2]  # the epoch's first window
    assert set(shard[: sum(lengths[s] for s in window)].tolist()) == set(window.tolist())


def test_damaged_shard_is_an_error_when_read(packed_store):
    store, _ = packed_store
    record = shards.read_record(store, "fuse", "train", 2)
    store.remove(f"fuse/train/{record['path']}/ids/c/0")
    r = reader(store, batch_size=40)
    with pytest.raises(FusionError, match=r"fuse/train/shard-00002\.[0-9a-f]+\.zarr/ids/c/0: missing"):
        for _ in range(10):
            next(r)
