"""Compact, exact encodings of sparse rows for the store (fusion/sparse.py has the convention).

Every transform here is lossless: decode(encode(x)) gives back x bit for bit. They turn the
arrays into small integers that zstd compresses well:

- log-probs: a row's log-probs are float16 in descending order, so their bit patterns
  (sign-magnitude, all negative) ascend; each entry is stored as the difference of its bit
  pattern to the previous entry of its row (wrapping uint16 arithmetic, so any values, even
  out of order, round-trip). Differences are a few hundred ulps: about one byte each.
- ids: row r describes token r (the real next token, `tokens[r]`). Where the real token is in
  the row, its position goes into `rank` (uint8; RANK_ABSENT where it is not) and its id is
  left out of the id stream, since `tokens` already holds it. The other ids are stored as
  their place in `id_table`, the shard's distinct ids from most to least frequent: frequent
  tokens get small numbers, so the high bytes are mostly zero.
- a row's real-token NLL equals minus the log-prob at `rank` wherever the token is listed (the
  logits stage computes both from the same float32 value), so only the other rows' NLL is
  stored (`nll_absent`). Sampled rows (fusion/scoring.py: sampled_rows) list estimates: their
  sampled entries all carry the row's smallest value, so the NLL of a row whose real token is
  listed at that value is stored too (`nll_estimated`, see `estimated_rows`).

Ids and tokens use the narrowest unsigned type of the vocabulary.
"""

from __future__ import annotations

import numpy as np

from fusion.errors import FusionError

RANK_ABSENT = 255


def id_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int64)


def narrow_uint(values: np.ndarray) -> np.ndarray:
    """Non-negative integers in the narrowest unsigned type that holds them all."""
    top = int(values.max(initial=0))
    return values.astype(id_dtype(top + 1))


def row_ptr(counts: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def delta_f16(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """float16 values -> uint16 differences of their bit patterns within each row."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    out = bits.copy()
    out[1:] -= bits[:-1]
    starts = ptr[:-1][ptr[:-1] < ptr[1:]]  # first entry of every non-empty row
    out[starts] = bits[starts]
    return out


def undelta_f16(deltas: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Inverse of delta_f16."""
    counts = np.diff(ptr)
    total = np.cumsum(deltas, dtype=np.uint16)  # running sum over all rows, wrapping
    # subtract, in every row, what the earlier rows added to the running sum
    before = np.zeros(len(counts), dtype=np.uint16)
    nonempty = counts > 0
    starts = ptr[:-1][nonempty]
    before[nonempty] = total[starts] - deltas[starts]
    bits = total - np.repeat(before, counts)
    return bits.view(np.float16)


def real_token_rank(counts: np.ndarray, ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per row: the position of tokens[r] among the row's ids, or RANK_ABSENT."""
    if int(counts.max(initial=0)) >= RANK_ABSENT:
        raise ValueError(f"rows of up to {RANK_ABSENT - 1} entries can be encoded, not {int(counts.max())}")
    ptr = row_ptr(counts)
    row = np.repeat(np.arange(len(counts)), counts)
    hit = ids.astype(np.int64) == tokens.astype(np.int64)[row]
    rank = np.full(len(counts), RANK_ABSENT, dtype=np.uint8)
    where = np.flatnonzero(hit)
    # ids within a row are distinct, so a row has at most one hit
    rank[row[where]] = (where - ptr[row[where]]).astype(np.uint8)
    return rank


def frequency_table(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, places): the distinct ids from most to least frequent (ties by id), and each
    id's place in it, so that table[places] == ids."""
    counts = np.bincount(ids.astype(np.int64)) if len(ids) else np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(counts)
    table = present[np.argsort(-counts[present], kind="stable")]
    lookup = np.zeros(len(counts), dtype=np.int64)
    lookup[table] = np.arange(len(table))
    return table, lookup[ids.astype(np.int64)]


def encode_rows(
    counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, tokens: np.ndarray | None, vocab_size: int
) -> dict[str, np.ndarray]:
    """Sparse rows as compact arrays: counts, lp_delta, id_table, ids (places in id_table),
    and rank when tokens are given."""
    counts = np.asarray(counts)
    if len(ids) and int(ids.min()) < 0:
        raise ValueError("sparse rows hold negative ids")
    dt = id_dtype(max(vocab_size, int(ids.max(initial=-1)) + 1))
    ptr = row_ptr(counts)
    out = {"counts": narrow_uint(counts), "lp_delta": delta_f16(logprobs.astype(np.float16), ptr)}
    if tokens is not None:
        rank = real_token_rank(counts, ids, tokens)
        keep = np.ones(len(ids), dtype=bool)
        listed = rank != RANK_ABSENT
        keep[ptr[:-1][listed] + rank[listed]] = False
        ids = ids[keep]
        out["rank"] = rank
    table, places = frequency_table(ids)
    out["id_table"] = table.astype(dt)
    out["ids"] = narrow_uint(places)
    return out


def decode_logprobs(stored: dict[str, np.ndarray]) -> np.ndarray:
    """The rows' log-probs (float16, flat) from counts and lp_delta."""
    return undelta_f16(stored["lp_delta"], row_ptr(stored["counts"].astype(np.int64)))


def decode_ids(stored: dict[str, np.ndarray], tokens: np.ndarray | None, id_type=np.int32) -> np.ndarray:
    """The rows' ids (flat) from counts, id_table, ids and, where the rows were stored
    against their real tokens, rank and tokens."""
    table, places = stored["id_table"], stored["ids"]
    if len(places) and int(places.max()) >= len(table):
        raise FusionError(f"stored rows: an id's place {int(places.max())} lies beyond the id table ({len(table)})")
    listed_ids = table.astype(id_type)[places]
    if "rank" not in stored:
        return listed_ids
    if tokens is None:
        raise FusionError("rows were stored against their real tokens; decoding their ids needs them")
    counts = stored["counts"].astype(np.int64)
    ptr = row_ptr(counts)
    rank = stored["rank"]
    if len(rank) != len(counts) or len(tokens) != len(counts):
        raise FusionError(f"stored rows: {len(counts)} rows but {len(rank)} ranks and {len(tokens)} tokens")
    listed = rank != RANK_ABSENT
    if np.any(rank[listed] >= counts[listed]):
        raise FusionError("stored rows: a real-token rank lies beyond its row")
    slot = ptr[:-1][listed] + rank[listed]
    keep = np.ones(int(ptr[-1]), dtype=bool)
    keep[slot] = False
    if int(keep.sum()) != len(listed_ids):
        raise FusionError(f"stored rows: {len(listed_ids)} ids but the ranks leave room for {int(keep.sum())}")
    ids = np.empty(int(ptr[-1]), dtype=id_type)
    ids[keep] = listed_ids
    ids[slot] = tokens[listed]
    return ids


def decode_rows(
    stored: dict[str, np.ndarray], tokens: np.ndarray | None, id_type=np.int32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts int32, ids, logprobs float16) from encode_rows' arrays."""
    return stored["counts"].astype(np.int32), decode_ids(stored, tokens, id_type), decode_logprobs(stored)


def encode_nll(nll: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The real-token NLL (float16) of the rows whose token is not listed."""
    return nll.astype(np.float16)[rank == RANK_ABSENT]


def estimated_rows(rank: np.ndarray, counts: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """For sampled rows: the rows whose real token is listed at the row's smallest log-prob, the
    value every sampled entry carries, an estimate rather than the token's own log-prob. (A
    certain entry that happens to share that value is included: storing its NLL is merely
    redundant.)"""
    ptr = row_ptr(np.asarray(counts, dtype=np.int64))
    listed = np.flatnonzero(rank != RANK_ABSENT)
    out = np.zeros(len(rank), dtype=bool)
    out[listed] = logprobs[ptr[listed] + rank[listed]] == logprobs[ptr[listed + 1] - 1]
    return out


def decode_nll(
    nll_absent: np.ndarray,
    rank: np.ndarray,
    counts: np.ndarray,
    logprobs: np.ndarray,
    nll_estimated: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of encode_nll, given the decoded log-probs; `nll_estimated` for sampled rows."""
    listed = rank != RANK_ABSENT
    if int((~listed).sum()) != len(nll_absent):
        absent = int((~listed).sum())
        raise FusionError(f"stored rows: {len(nll_absent)} NLL values for {absent} rows without their token")
    nll = np.empty(len(rank), dtype=np.float16)
    nll[~listed] = nll_absent
    nll[listed] = -logprobs[row_ptr(counts)[:-1][listed] + rank[listed]]
    if nll_estimated is not None:
        estimated = estimated_rows(rank, counts, logprobs)
        if int(estimated.sum()) != len(nll_estimated):
            expected = int(estimated.sum())
            raise FusionError(f"stored rows: {len(nll_estimated)} NLL values for {expected} rows listing an estimate")
        nll[estimated] = nll_estimated
    return nll
