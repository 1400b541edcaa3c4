"""The trainer's reader (fusion/training/data.py): packed shards streamed from local or S3
stores, decoded into exactly the data that was packed, in the seeded lane order, split across
ranks that each fetch only their own lanes' shards, within a bounded number of shards in
memory, resumable at any micro-batch."""

import numpy as np
import pytest
import torch

from fusion import shards
from fusion.errors import FusionError
from fusion.sparse import SparseRows
from fusion.stages import fuse
from fusion.store import Store
from fusion.training import data
from fusion.training.data import PackedReader, epoch_order
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


def write(store: Store, parts) -> None:
    for i, (tokens, ptr, rows, choice) in enumerate(parts):
        shards.write_shard(store, "fuse", "train", i, fuse.pack(tokens, ptr, rows, choice, VOCAB), "h", rows=rows.rows)
    shards.commit_part(store, "fuse", "train", len(parts), "h")


@pytest.fixture(params=["file", *S3_BACKENDS])
def packed_store(request, tmp_path):
    """A committed fuse part of 5 shards of 7..19 blocks, and the data that was packed."""
    if request.param == "file":
        store = Store(str(tmp_path / "run"))
    else:
        store = s3_store(request, request.param)
    parts = [synthetic_shard(i, 7 + 3 * i) for i in range(5)]
    write(store, parts)
    return store, parts


def expected(parts, blocks):
    """The tensors of global blocks `blocks`, built from the packed data by hand."""
    where = [(s, j) for s, p in enumerate(parts) for j in range(len(p[1]) - 1)]
    picked = [where[b] for b in blocks]
    spans = [(parts[s][1][j], parts[s][1][j + 1]) for s, j in picked]
    longest = max(int(z - a) for a, z in spans)
    k = max(1, max(int(parts[s][2].counts[a:z].max(initial=0)) for (s, _), (a, z) in zip(picked, spans)))
    out = {
        "inputs": torch.full((len(blocks), longest + 1), PAD, dtype=torch.int64),
        "mask": torch.zeros((len(blocks), longest + 1), dtype=torch.int64),
        "labels": torch.full((len(blocks), longest), -100, dtype=torch.int64),
        "teacher_ids": torch.full((len(blocks), longest, k), -1, dtype=torch.int64),
        "teacher_logprobs": torch.full((len(blocks), longest, k), -float("inf")),
        "teacher_tail": torch.zeros((len(blocks), longest)),
    }
    out["inputs"][:, 0] = BOS
    for r, ((s, _), (a, z)) in enumerate(zip(picked, spans)):
        tokens, _, rows, _ = parts[s]
        n = int(z - a)
        out["inputs"][r, 1 : n + 1] = torch.from_numpy(tokens[a:z])
        out["mask"][r, : n + 1] = 1
        out["labels"][r, :n] = torch.from_numpy(tokens[a:z])
        ptr = rows.ptr
        for t in range(n):
            lo, hi = ptr[a + t], ptr[a + t + 1]
            out["teacher_ids"][r, t, : hi - lo] = torch.from_numpy(rows.ids[lo:hi].astype(np.int64))
            out["teacher_logprobs"][r, t, : hi - lo] = torch.from_numpy(rows.logprobs[lo:hi])
        out["teacher_tail"][r, :n] = torch.from_numpy(rows.tail[a:z])
    return out, [int(parts[s][3][j]) for s, j in picked]


def reader(store, **kw):
    settings = {"batch_size": 6, "seed": 3, "lanes": 4, "bos": BOS, "pad": PAD, "width": VOCAB, "candidates": 3}
    return PackedReader(store, config_hash="h", **{**settings, **kw})


def test_batches_are_the_packed_blocks_in_the_seeded_order(packed_store):
    store, parts = packed_store
    r = reader(store, micro_batch_size=3, prefetch_batches=3)
    steps = 2 * r.blocks // 6 + 1  # across an epoch boundary
    for step in range(steps):
        batches = r.step_batches(step)
        assert [(b.step, b.micro, b.last) for b in batches] == [(step, 0, False), (step, 1, True)]
        blocks = r.global_batch(step)
        assert np.concatenate([b.blocks for b in batches]).tolist() == blocks.tolist()
        for got, part in zip(batches, (blocks[:3], blocks[3:])):
            want, choice = expected(parts, part)
            for name, tensor in want.items():
                assert getattr(got, name).dtype == tensor.dtype and torch.equal(getattr(got, name), tensor), name
            assert got.choice == np.bincount(choice, minlength=3).tolist()
            assert got.tokens == int((want["labels"] != -100).sum()) and got.skipped == []
    r.close()
    order = np.concatenate([r.global_batch(s) for s in range(steps)])
    n = r.blocks
    assert sorted(order[:n].tolist()) == list(range(n)) and sorted(order[n : 2 * n].tolist()) == list(range(n))


def test_ranks_split_the_global_batch(packed_store):
    store, _ = packed_store
    single = reader(store)
    ranks = [reader(store, rank=r, world_size=3, micro_batch_size=1) for r in range(3)]
    for step in range(4):
        (whole,) = single.step_batches(step)
        mine = [r.step_batches(step) for r in ranks]
        for rank, batches in enumerate(mine):
            assert [b.blocks.tolist() for b in batches] == [[int(b)] for b in whole.blocks[rank::3]]
        assert sum(b.tokens for r in mine for b in r) == whole.tokens
    for r in [single, *ranks]:
        r.close()


def test_position_saves_and_restores_mid_step(packed_store):
    store, _ = packed_store
    first = reader(store, micro_batch_size=3)
    for _ in range(5):  # two steps and the first micro-batch of the third
        next(first)
    state = first.state_dict()
    assert (state["step"], state["micro"]) == (2, 1)
    wanted = [next(first) for _ in range(6)]
    first.close()
    resumed = reader(store, micro_batch_size=3)
    resumed.load_state_dict(state)
    for want in wanted:
        got = next(resumed)
        assert (got.step, got.micro) == (want.step, want.micro)
        for name in ("inputs", "mask", "labels", "teacher_ids", "teacher_logprobs", "teacher_tail"):
            assert torch.equal(getattr(got, name), getattr(want, name))
    resumed.close()
    with pytest.raises(FusionError, match="seed=3, this reader 4"):
        reader(store, seed=4).load_state_dict(state)
    with pytest.raises(FusionError, match="lanes=4, this reader 2"):
        reader(store, lanes=2).load_state_dict(state)


def test_lane_order():
    """Each epoch: shards shuffled, their blocks cut into `lanes` contiguous streams of equal
    length, each shuffled within windows; position i is the next block of lane i mod lanes."""
    lengths = [7, 10, 13, 16, 19, 12, 12, 12]
    first = np.concatenate([[0], np.cumsum(lengths)])
    total, lanes = sum(lengths), 3
    a = epoch_order(lengths, 3, 0, lanes=lanes, window_shards=1)
    assert sorted(a.tolist()) == list(range(total))
    assert np.array_equal(a, epoch_order(lengths, 3, 0, lanes=lanes, window_shards=1))
    assert not np.array_equal(a, epoch_order(lengths, 3, 1, lanes=lanes, window_shards=1))
    shard_order = np.random.default_rng([3, 0]).permutation(len(lengths))
    sequence = np.concatenate([np.arange(first[s], first[s + 1]) for s in shard_order])
    window = int(np.ceil(total / len(lengths)))  # one shard's worth of blocks on average
    begin = 0
    for lane in range(lanes):
        stream = a[lane::lanes]
        assert len(stream) in (total // lanes, total // lanes + 1)
        mine = sequence[begin : begin + len(stream)]
        begin += len(stream)
        for w in range(0, len(stream), window):
            assert sorted(stream[w : w + window].tolist()) == sorted(mine[w : w + window].tolist())
        assert not np.array_equal(stream, mine)
    assert begin == total


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_rank_fetches_only_its_lanes_shards_within_the_budget(tmp_path, monkeypatch, world_size):
    """24 shards of 5 blocks, 4 lanes, a global batch of 4: over two epochs every rank fetches
    only shards that hold blocks it trains on (now or in the steps it prefetched), never holds
    more than its budget at once, and the ranks of a world of 2 or 4 fetch disjoint shares of
    each epoch but for the shards at lane borders (which two lanes share)."""
    store = Store(str(tmp_path / "run"))
    write(store, [synthetic_shard(i, 5) for i in range(24)])
    fetched: list[int] = []
    real = data.read_shard
    monkeypatch.setattr(data, "read_shard", lambda s, i, h: fetched.append(i) or real(s, i, h))
    per_rank = []
    for rank in range(world_size):
        fetched.clear()
        r = reader(store, batch_size=4, lanes=4, rank=rank, world_size=world_size, budget_shards=6)
        held, used = 0, set()
        for step in range(2 * r.steps(1)):
            for batch in r.step_batches(step):
                used.update(int(s) for s in r.shard_of(batch.blocks))
                held = max(held, len(r._shards))
        r.close()
        assert held <= 6
        ahead = set(r.shard_of(r.rank_blocks(0, 3 * r.steps(1)).ravel()).tolist())  # prefetched beyond the end
        assert used <= set(fetched) <= ahead
        per_rank.append(len(fetched))
    # an epoch has 24 shards; each lane border splits at most one shard between two lanes; and
    # each rank prefetched up to its budget past the last step
    assert sum(per_rank) <= 2 * (24 + 4) + 6 * world_size
    assert max(per_rank) <= 2 * (24 // world_size + 4) + 6


def test_a_block_with_ids_beyond_the_logits_is_named(packed_store):
    store, parts = packed_store
    r = reader(store, width=int(parts[2][0].max()), batch_size=r_blocks(parts))
    with pytest.raises(FusionError, match=r"fuse/train/shard-0000\d block \d+ holds (token|teacher) id \d+ but the target"):
        next(r)


def r_blocks(parts) -> int:
    return sum(len(p[1]) - 1 for p in parts)


def test_damaged_shard_is_an_error_when_read(packed_store):
    store, _ = packed_store
    record = shards.read_record(store, "fuse", "train", 2)
    store.remove(f"fuse/train/{record['path']}/ids/c/0")
    r = reader(store, batch_size=40)
    with pytest.raises(FusionError, match=r"fuse/train/shard-00002\.[0-9a-f]+\.zarr/ids/c/0: missing"):
        for _ in range(10):
            next(r)


def test_an_uncommitted_packed_set_is_refused(tmp_path):
    with pytest.raises(FusionError, match="is not committed .run the fuse stage first"):
        reader(Store(str(tmp_path / "none")))
