"""The compact encodings give back every bit."""

import numpy as np
import pytest

from fusion import encoding
from fusion.errors import FusionError


def rows(seed: int, n: int = 3000, vocab: int = 40000, max_k: int = 12, dense: bool = False):
    rng = np.random.default_rng(seed)
    counts = np.full(n, max_k) if dense else rng.integers(0, max_k + 1, size=n)
    ids = np.concatenate([rng.choice(vocab, size=c, replace=False) for c in counts]).astype(np.int64)
    lp = -np.abs(rng.standard_t(2, size=len(ids)) * 3)
    ptr = encoding.row_ptr(counts)
    lp = np.concatenate([np.sort(lp[a:b])[::-1] for a, b in zip(ptr[:-1], ptr[1:])])
    lp = lp.astype(np.float16)
    lp[:: 97] = np.float16(0.0)  # specials: zeros, positives, -inf, nan, unsorted entries
    lp[1::89] = np.float16(3e-5)
    lp[2::101] = -np.inf
    lp[3::211] = np.nan
    tokens = rng.integers(0, vocab, size=n)
    hit = rng.random(n) < 0.5
    ptr = encoding.row_ptr(counts)
    for r in np.flatnonzero(hit & (counts > 0)):
        tokens[r] = ids[ptr[r] + rng.integers(counts[r])]
    return counts, ids, lp, tokens


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("with_tokens", [False, True])
def test_rows_roundtrip_bit_exact(dense, with_tokens):
    counts, ids, lp, tokens = rows(0, dense=dense)
    stored = encoding.encode_rows(counts, ids, lp, tokens if with_tokens else None, 40000)
    assert stored["ids"].dtype == np.uint16 and stored["lp_delta"].dtype == np.uint16
    assert ("rank" in stored) == with_tokens
    c, i, p = encoding.decode_rows(stored, tokens if with_tokens else None)
    assert np.array_equal(c, counts) and np.array_equal(i, ids) and same_bits(p, lp)


def test_listed_real_tokens_leave_the_id_stream():
    counts, ids, lp, tokens = rows(1, dense=True)
    stored = encoding.encode_rows(counts, ids, lp, tokens, 40000)
    listed = stored["rank"] != encoding.RANK_ABSENT
    assert len(stored["ids"]) == len(ids) - int(listed.sum())
    ptr = encoding.row_ptr(counts)
    assert np.array_equal(ids[ptr[:-1][listed] + stored["rank"][listed]], tokens[listed])


def test_frequent_ids_get_small_places():
    ids = np.array([7, 9, 7, 30000, 7, 9], dtype=np.int64)
    table, places = encoding.frequency_table(ids)
    assert table.tolist() == [7, 9, 30000] and places.tolist() == [0, 1, 0, 2, 0, 1]


def test_nll_of_listed_tokens_is_derived():
    counts, ids, lp, tokens = rows(2, dense=True)
    lp = np.nan_to_num(lp, nan=-1.0)
    rank = encoding.real_token_rank(counts, ids, tokens)
    listed = rank != encoding.RANK_ABSENT
    nll = np.random.default_rng(3).random(len(counts)).astype(np.float32) * 5
    nll[listed] = -lp[encoding.row_ptr(counts)[:-1][listed] + rank[listed]].astype(np.float32)
    stored = encoding.encode_nll(nll, rank)
    assert len(stored) == int((~listed).sum())
    assert same_bits(encoding.decode_nll(stored, rank, counts, lp), nll.astype(np.float16))


def test_inconsistent_arrays_are_errors():
    counts, ids, lp, tokens = rows(4, dense=True)
    stored = encoding.encode_rows(counts, ids, lp, tokens, 40000)
    with pytest.raises(FusionError, match="needs them"):
        encoding.decode_ids(stored, None)
    short = {**stored, "ids": stored["ids"][:-1]}
    with pytest.raises(FusionError, match="ranks leave room for"):
        encoding.decode_ids(short, tokens)
    bad = {**stored, "rank": np.where(stored["rank"] == encoding.RANK_ABSENT, 0, 200).astype(np.uint8)}
    with pytest.raises(FusionError, match="rank lies beyond its row"):
        encoding.decode_ids(bad, tokens)
    with pytest.raises(ValueError, match="negative ids"):
        encoding.encode_rows(counts, -ids - 1, lp, None, 40000)


def test_narrowest_types():
    assert encoding.id_dtype(256) == np.uint8 and encoding.id_dtype(257) == np.uint16
    assert encoding.id_dtype(65536) == np.uint16 and encoding.id_dtype(152064) == np.uint32
    assert encoding.narrow_uint(np.array([0, 70000])).dtype == np.uint32
