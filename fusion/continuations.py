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
masses and its top-m are read from that range alone: short ranges through a gathered window,
the few long ones (short prefixes such as " ") one slice per distinct range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from fusion.sparse import canonical_order

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
    width = min(m, len(ranges.order))
    ids = torch.full((total, m), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros((total, m), dtype=torch.float64, device=device)
    if total == 0:
        return depths, ids.int(), logprobs.half(), torch.zeros(0, dtype=torch.float16, device=device)
    has = torch.nonzero(depths).squeeze(1)  # rows whose token has a boundary inside it
    probs = torch.softmax(logits[has], dim=-1)
    row = torch.repeat_interleave(torch.arange(len(has), device=device), depths[has])  # into probs
    first = torch.cumsum(depths[has], 0) - depths[has]
    depth = torch.arange(total, device=device) - first[row]  # 0-based
    token = targets.long()[has][row]
    equal, lo, hi = ranges.equal[token, depth], ranges.longer[token, depth], ranges.end[token, depth]

    in_order = probs.index_select(1, ranges.order)  # [rows, S]: probabilities in byte-sorted order
    size = in_order.shape[1]
    flat = in_order.view(-1)

    def window(starts, ends, count):
        """Values of in_order[row, starts + j] for j < count, -1 at or past ends (flat indices are
        much faster than two-dimensional ones)."""
        cols = starts[:, None] + torch.arange(count, device=device)
        inside = cols < ends[:, None]
        at = (row_of[:, None] * size + cols.clamp(max=size - 1)).view(-1)
        return flat[at].view(cols.shape).masked_fill(~inside, -1.0), cols

    # tokens spelling exactly the written bytes: a few at most per range, read directly
    row_of = row
    vals, _ = window(equal, lo, max(int((lo - equal).max()), 1))
    equal_mass = vals.clamp_min(0.0).double().sum(1)
    # tokens spelling any prefix of the written bytes, the shorter ones included: a running sum per row
    running = torch.cumsum(equal_mass, 0)
    prefix_mass = running - (running - equal_mass)[first[row]]

    # tokens longer than the written bytes: their mass and their m most probable, range by range
    values = torch.full((total, width), -1.0, dtype=probs.dtype, device=device)
    places = torch.zeros((total, width), dtype=torch.long, device=device)
    longer_mass = torch.zeros(total, dtype=torch.float64, device=device)
    small = torch.nonzero((hi - lo) <= WINDOW).squeeze(1)
    if len(small):
        row_of = row[small]
        vals, cols = window(lo[small], hi[small], WINDOW)
        longer_mass[small] = vals.clamp_min(0.0).double().sum(1)
        top, pick = vals.topk(width, dim=-1)
        values[small], places[small] = top, cols.gather(-1, pick)
    large = torch.nonzero((hi - lo) > WINDOW).squeeze(1)
    if len(large):
        # few distinct long ranges (short prefixes such as " " or " t"): one slice per range
        spans, group = torch.unique(torch.stack([lo[large], hi[large]], 1), dim=0, return_inverse=True)
        for g, (a, b) in enumerate(spans.tolist()):
            which = large[group == g]
            vals = in_order[:, a:b].index_select(0, row[which])
            longer_mass[which] = vals.double().sum(1)
            top, pick = vals.topk(min(width, b - a), dim=-1)
            values[which, : top.shape[1]], places[which, : top.shape[1]] = top, pick + a
    possible = longer_mass + prefix_mass

    found = torch.where(values > 0, ranges.order[places], torch.full_like(places, -1))
    values = values.clamp_min(0.0).double()
    # padding (value 0) sorts last
    found, values = canonical_order(torch.where(found < 0, torch.iinfo(torch.int64).max, found), values)
    share = values / possible.clamp_min(1e-300)[:, None]
    ids[:, :width] = torch.where(values > 0, found, torch.full_like(found, -1))
    logprobs[:, :width] = torch.where(values > 0, torch.log(share.clamp_min(1e-300)), torch.zeros_like(share))
    tail = (1.0 - share.sum(-1)).clamp(0.0, 1.0)
    return depths, ids.int(), logprobs.half(), tail.half()
