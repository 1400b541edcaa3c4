"""Continuation rows: what a source model says about the text after a byte boundary inside its
own token.

A target whose token boundaries fall inside a source token (GPT-2 splitting the run of spaces
that Qwen writes as one token, stories260K's short pieces against any large vocabulary) needs,
at such a boundary, the source's belief about the bytes still to be written. Row i of the
source (its distribution over token s_i given the text before s_i) holds that belief for every
boundary inside s_i, but only the full distribution does: after the first d bytes p = s_i[:d]
are written, the tokens that can still follow are those that begin with p (they go on with
their remaining bytes) and those that are a prefix of p (the source would have cut there; what
follows them is not in the row). A stored top-k seldom lists more than the real token among
them, and a top-k that misses the real token lists none.

So the logits stage stores, beside each row's top-k, one continuation row per byte boundary
inside the row's real token (up to MAX_DEPTH of them): the m most probable tokens that begin
with p and are longer than it, their probabilities divided by the mass of every token that can
still follow (those that begin with p plus those that are a prefix of it), and the rest of that
mass as the tail (it belongs to unlisted tokens and to tokens that end inside p, whose
continuation is unknown). The alignment (align/default.py) reads the row for depth d where a
target boundary falls d bytes into s_i. Nothing here depends on the target: one capture serves
every target.

A byte-sorted order of the vocabulary makes it cheap: the tokens that begin with p are one
contiguous range of it, found once per (token, depth) when the tables are built, so a row's
masses are differences of one cumulative sum and its top-m is a top-m over a range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

MAX_DEPTH = 16  # continuation rows per source row at most (boundaries deeper in a token get none)
WINDOW = 256  # ranges up to this many tokens are searched through a gathered window, longer ones in place


@dataclass(frozen=True)
class PrefixRanges:
    """For token x and depth d (column d - 1): where, in the byte-sorted order of the text
    tokens, the tokens spelling exactly x[:d] start (`equal`), those that are longer and begin
    with x[:d] start (`longer`) and both end (`end`)."""

    order: np.ndarray  # int64 [S]: the ids of the tokens that stand for text, sorted by their bytes
    depths: np.ndarray  # int64 [V]: continuation rows for a row whose real token is x: min(len - 1, MAX_DEPTH)
    equal: np.ndarray  # int64 [V, MAX_DEPTH]
    longer: np.ndarray  # int64 [V, MAX_DEPTH]
    end: np.ndarray  # int64 [V, MAX_DEPTH]


def prefix_ranges(view) -> PrefixRanges:
    """The ranges of a fusion.align.tokens.TokenView (cached on the view)."""
    cached = view.__dict__.get("_prefix_ranges")
    if cached is not None:
        return cached
    lengths = view.lengths
    text = np.flatnonzero((lengths > 0) & ~view.special)
    order = np.array(sorted(text, key=view.token_bytes), dtype=np.int64)
    sorted_lengths = lengths[order].astype(np.int64)
    sorted_ptr = np.zeros(len(order) + 1, np.int64)
    np.cumsum(sorted_lengths, out=sorted_ptr[1:])
    sorted_data = np.concatenate([view.data[view.ptr[i] : view.ptr[i + 1]] for i in order]) if len(order) else view.data[:0]
    depths = np.zeros(view.size, np.int64)
    depths[text] = np.minimum(lengths[text] - 1, MAX_DEPTH)
    equal, longer, end = _ranges(view.data, view.ptr.astype(np.int64), depths, sorted_data, sorted_ptr)
    ranges = PrefixRanges(order, depths, equal, longer, end)
    view.__dict__["_prefix_ranges"] = ranges
    return ranges


@njit(cache=True)
def _compare(sdata, sptr, r, data, p0, d):
    """Sorted string r against the d bytes data[p0:p0+d], on r's first d bytes: -1, 0 or 1
    (a string shorter than d that is a prefix of them sorts before them)."""
    a = sptr[r]
    size = sptr[r + 1] - a
    for q in range(min(size, d)):
        x, y = sdata[a + q], data[p0 + q]
        if x != y:
            return -1 if x < y else 1
    return -1 if size < d else 0


@njit(cache=True)
def _ranges(data, ptr, depths, sdata, sptr):
    V = len(depths)
    S = len(sptr) - 1
    equal = np.zeros((V, MAX_DEPTH), np.int64)
    longer = np.zeros((V, MAX_DEPTH), np.int64)
    end = np.zeros((V, MAX_DEPTH), np.int64)
    for x in range(V):
        for d in range(1, depths[x] + 1):
            lo, hi = 0, S  # first string >= the prefix
            while lo < hi:
                mid = (lo + hi) // 2
                if _compare(sdata, sptr, mid, data, ptr[x], d) < 0:
                    lo = mid + 1
                else:
                    hi = mid
            first = lo
            hi = S  # first string > the prefix (on its first d bytes)
            while lo < hi:
                mid = (lo + hi) // 2
                if _compare(sdata, sptr, mid, data, ptr[x], d) <= 0:
                    lo = mid + 1
                else:
                    hi = mid
            past = first
            while past < lo and sptr[past + 1] - sptr[past] == d:
                past += 1  # strings equal to the prefix sort first in its range
            equal[x, d - 1], longer[x, d - 1], end[x, d - 1] = first, past, lo
    return equal, longer, end


class OnDevice:
    """PrefixRanges as torch tensors on one device (built once per model)."""

    def __init__(self, ranges: PrefixRanges, device):
        import torch

        self.order = torch.as_tensor(ranges.order, device=device)
        self.depths = torch.as_tensor(ranges.depths, device=device)
        self.equal = torch.as_tensor(ranges.equal, device=device)
        self.longer = torch.as_tensor(ranges.longer, device=device)
        self.end = torch.as_tensor(ranges.end, device=device)


def continuation_rows(logits, targets, ranges: OnDevice, m: int):
    """For float32 logits [rows, vocab] and each row's real token: (depths int [rows], ids
    int32 [T, m] with -1 padding, log-probs float16 [T, m], tail float16 [T]), T = depths.sum(),
    the continuation rows of row r at depths 1..depths[r] back to back in row order. Entries
    are ordered by probability, ties by id."""
    import torch

    device = logits.device
    depths = ranges.depths[targets.long()]
    total = int(depths.sum())
    if total == 0:
        return (depths, torch.full((0, m), -1, dtype=torch.int32, device=device),
                torch.zeros((0, m), dtype=torch.float16, device=device),
                torch.zeros(0, dtype=torch.float16, device=device))
    probs = torch.softmax(logits, dim=-1)
    row = torch.repeat_interleave(torch.arange(len(depths), device=device), depths)
    first = torch.cumsum(depths, 0) - depths  # each row's first continuation row
    depth = torch.arange(total, device=device) - first[row]  # 0-based
    token = targets.long()[row]
    equal, lo, hi = ranges.equal[token, depth], ranges.longer[token, depth], ranges.end[token, depth]

    in_order = probs[:, ranges.order]  # [rows, S]: probabilities in byte-sorted order
    cumulative = torch.zeros((in_order.shape[0], in_order.shape[1] + 1), dtype=torch.float64, device=device)
    cumulative[:, 1:] = torch.cumsum(in_order, dim=1, dtype=torch.float64)
    longer_mass = cumulative[row, hi] - cumulative[row, lo]
    equal_mass = cumulative[row, lo] - cumulative[row, equal]
    # tokens spelling any prefix of p, the shorter ones included: a running sum within each row
    running = torch.cumsum(equal_mass, 0)
    before = (running - equal_mass)[first[row]]
    possible = longer_mass + running - before

    width = min(m, in_order.shape[1])
    values = torch.full((total, width), -1.0, dtype=in_order.dtype, device=device)
    places = torch.zeros((total, width), dtype=torch.long, device=device)
    small = (hi - lo) <= WINDOW
    for chosen, window in ((small, True), (~small, False)):
        which = torch.nonzero(chosen).squeeze(1)
        if len(which) == 0:
            continue
        a, b, r = lo[which], hi[which], row[which]
        if window:
            cols = a[:, None] + torch.arange(WINDOW, device=device)
            inside = cols < b[:, None]
            vals = in_order[r[:, None], cols.clamp(max=in_order.shape[1] - 1)].masked_fill(~inside, -1.0)
        else:
            cols = torch.arange(in_order.shape[1], device=device).expand(len(which), -1)
            inside = (cols >= a[:, None]) & (cols < b[:, None])
            vals = in_order[r].masked_fill(~inside, -1.0)
        top, pick = vals.topk(min(width, vals.shape[1]), dim=-1)
        values[which, : top.shape[1]] = top
        places[which, : top.shape[1]] = cols.gather(-1, pick)
    ids = torch.where(values > 0, ranges.order[places], torch.full_like(places, -1))
    values = values.clamp_min(0.0).double()
    # canonical order: by probability, descending; ties by ascending id (padding last)
    ids, order = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids).sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    ids = torch.where(values > 0, ids, torch.full_like(ids, -1))
    share = values / possible.clamp_min(1e-300)[:, None]
    logprobs = torch.where(values > 0, torch.log(share.clamp_min(1e-300)), torch.zeros_like(share))
    tail = (1.0 - share.sum(-1)).clamp(0.0, 1.0)
    if width < m:
        pad = m - width
        ids = torch.cat([ids, torch.full((total, pad), -1, dtype=ids.dtype, device=device)], 1)
        logprobs = torch.cat([logprobs, torch.zeros((total, pad), dtype=logprobs.dtype, device=device)], 1)
    return depths, ids.int(), logprobs.half(), tail.half()
