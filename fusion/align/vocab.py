"""Vocabulary maps: every source token id -> a target token id (or -1).

Modes:
- "reference-hard": the target token with exactly the source token's string, its space marker
  spelled as the target's (FuseLLM's hard mode); -1 where there is none.
- "reference-soft": FuseLLM's `find_best_mapping`: that exact string if the target has it, else the
  target token whose string is nearest by Levenshtein distance over code points, the lowest id
  winning ties (the original scans the target vocabulary in id order and keeps the first minimum).
  The original computes all |V_s| x |V_t| distances (827 s on 2 processes for 50k x 32k); we find
  the same token exactly, without comparing most pairs: a target within distance d of the query
  holds all but at most d of the query's characters (as a multiset), so it holds one of any d + 1
  of them; the search reads the targets holding the query's rarest characters, near its length
  first, bounds each by length and shared characters, computes the distance (bit-parallel) only
  where the bound does not already rule it out, and stops once the characters read outnumber the
  best distance found (details above StringIndex).
- "default": by the bytes tokens stand for (tokens.py). A target token with the same bytes, else
  the longest target token whose bytes are a PREFIX of the source token's: the distance here is
  the number of trailing source bytes the target token leaves to later tokens, and only prefixes
  are admissible, because probability the source gives to "the text goes on with these bytes"
  belongs to the target token the text would then start with, not to a look-alike (" cat" ->
  " ca" rather than " hat"). Byte-fallback pieces only count for bytes the target has no
  ordinary token for (it never emits "<0xC3>" for an "é" it has a token for): where ordinary
  target tokens continue the bytes (a source token that ends inside a character), the target
  token is unknowable and the map says -1. Where several target tokens spell the same bytes,
  added tokens win over model tokens and model tokens over byte-fallback pieces (the order
  tokenizers produce them in), then the lowest id. A source BOS/EOS maps to the target's BOS/EOS
  (EOS first where a tokenizer uses one token for both); other special tokens, and bytes the
  target cannot spell at all, map to the target's unknown token if it has one, else -1.

`continuation_table` / `dummy_prefix_table` extend the default map to source tokens whose first
bytes are already committed (default.py) or that follow a target's dummy space. All three walk a
byte trie of the target's ordinary tokens in compiled code (ByteTrie; FirstToken is the same
rule in plain Python, which the tests compare it with).

Maps are cached on disk, keyed by both views' hashes and the mode, in $FUSION_CACHE_DIR (default
~/.cache/fusion), written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from numba import njit

from .tokens import TokenView, codepoints

MAP_VERSION = "2"


def cache_dir() -> Path:
    return Path(os.environ.get("FUSION_CACHE_DIR") or Path.home() / ".cache" / "fusion")


_memory: dict[str, np.ndarray] = {}  # tables this process has built or read


def cached(kind: str, source: TokenView, target: TokenView, size: int, build) -> np.ndarray:
    """build() once per (kind, source, target), kept in memory and in the on-disk cache; a cached
    table of another length than `size` (a damaged file) is rebuilt."""
    key = hashlib.sha256(f"{kind}:{MAP_VERSION}:{source.hash}:{target.hash}".encode()).hexdigest()[:40]
    path = cache_dir() / "vocab" / f"{kind}-{key}.npy"
    table = _memory.get(str(path))
    if table is not None:
        return table
    try:
        table = np.load(path)
        if table.shape == (size,) and table.dtype == np.int32:
            _memory[str(path)] = table
            return table
    except (OSError, ValueError):
        pass
    table = _memory[str(path)] = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache is not an error: the table is simply rebuilt next time
    return table


# --- reference modes -------------------------------------------------------------------------

def spelled_as_target(source: TokenView, target: TokenView) -> list[str]:
    """Source token strings with the source's space marker spelled as the target's."""
    if not source.marker or source.marker == target.marker:
        return list(source.strings)
    return [s.replace(source.marker, target.marker) for s in source.strings]


def hard_map(source: TokenView, target: TokenView) -> np.ndarray:
    vocab = target.vocab
    return np.array([vocab.get(s, -1) if s else -1 for s in spelled_as_target(source, target)], dtype=np.int32)


# reference-soft's nearest-string search. A query x is compared with the target strings y as
# multisets of characters: x's "elements" are (c, k) for each character c and k = 1 .. count of c
# in x, and y holds (c, k) if it has c at least k times. If y holds s of x's elements,
# lev(x, y) >= max(|x|, |y|) - s (the bag distance), so lev(x, y) <= j implies that y holds at
# least |x| - j of them: at least one of ANY j + 1 of them. The search reads the targets holding
# x's elements, rarest element first, computing distances bounded by the best so far, and stops
# once the elements read outnumber the best distance: every target that could still tie or win
# has been read. Targets holding none of x's elements are at distance max(|x|, |y|) exactly.
# Index and queries are prepared with numpy; the compiled part is plain loops (quick to compile).

def _char_masks(flat: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Per string: a 64-bit set of (hashed) characters it contains."""
    bit = (flat.astype(np.uint64) * np.uint64(2654435761) >> np.uint64(13)) & np.uint64(63)
    bits = np.left_shift(np.uint64(1), bit)
    masks = np.zeros(len(ptr) - 1, np.uint64)
    np.bitwise_or.at(masks, np.repeat(np.arange(len(ptr) - 1), np.diff(ptr)), bits)
    return masks


def _occurrence(owner: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per position: how many earlier positions of the same owner hold the same value."""
    order = np.lexsort((values, owner))
    o, v = owner[order], values[order]
    run = np.flatnonzero(np.r_[True, (o[1:] != o[:-1]) | (v[1:] != v[:-1])])
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(run, np.diff(np.r_[run, len(order)]))
    return rank


class StringIndex:
    """A target vocabulary's strings prepared for the nearest-string search (built once per
    vocabulary: soft_map keeps it on the target's view).

    Element e = first[c] + k - 1 stands for (chars[c], k), k <= the most times any target has that
    character; holders[start[e]:start[e + 1]] are the targets holding it, in order of (length, id),
    with their lengths and character masks beside them."""

    def __init__(self, targets: list[str]):
        self.tf, self.tp = codepoints(targets)
        lengths = np.diff(self.tp)
        usable = np.flatnonzero(lengths > 0)  # empty target strings never win
        self.by_length = usable[np.lexsort((usable, lengths[usable]))]
        self.length_start = np.searchsorted(lengths[self.by_length], np.arange(lengths.max(initial=0) + 2))
        self.longest = int(lengths.max(initial=0))
        self.chars, ty = np.unique(self.tf, return_inverse=True)
        self.ty = ty.astype(np.int32)  # the target characters as indices into chars
        owner = np.repeat(np.arange(len(targets)), lengths)
        rank = _occurrence(owner, self.ty)
        self.most = np.zeros(len(self.chars), np.int64)
        np.maximum.at(self.most, self.ty, rank + 1)
        self.first = np.r_[0, np.cumsum(self.most)]
        element = self.first[self.ty] + rank
        order = np.lexsort((owner, lengths[owner], element))
        self.start = np.searchsorted(element[order], np.arange(self.first[-1] + 1))
        self.holders = owner[order].astype(np.int32)
        self.holder_length = lengths[self.holders].astype(np.int32)
        self.holder_mask = _char_masks(self.tf, self.tp)[self.holders]

    def nearest(self, queries: list[str]) -> np.ndarray:
        """For each query: the index of the first target (in list order) at minimum Levenshtein
        distance."""
        from concurrent.futures import ThreadPoolExecutor

        qf, qp = codepoints(queries)
        sizes = np.diff(qp)
        owner = np.repeat(np.arange(len(queries)), sizes)
        c = np.minimum(np.searchsorted(self.chars, qf), max(len(self.chars) - 1, 0))
        known = (self.chars[c] == qf) if len(self.chars) else np.zeros(len(qf), bool)
        rank = _occurrence(owner, qf)
        held = known.copy()
        held[known] = rank[known] < self.most[c[known]]
        element = self.first[c[held]] + rank[held]
        lo, hi = np.zeros(len(qf), np.int64), np.zeros(len(qf), np.int64)  # elements no target holds: none
        lo[held], hi[held] = self.start[element], self.start[element + 1]
        rarest = np.lexsort((hi - lo, owner))  # each query's elements stay in its own range
        out = np.full(len(queries), -1, np.int32)
        args = (qf, qp, np.where(known, c, -1), _char_masks(qf, qp), lo[rarest], hi[rarest], self.tf, self.ty, self.tp,
                self.by_length, self.length_start, self.holders, self.holder_length, self.holder_mask, len(self.chars),
                int(max(self.longest, sizes.max(initial=0))), out)
        step = 2000
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(lambda q0: _nearest_range(q0, min(q0 + step, len(queries)), *args),
                          range(0, len(queries), step)))
        return out


@njit(cache=True, nogil=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True, nogil=True)
def _bounded_distance(x, x0, x1, y, y0, y1, bound, row):
    """Levenshtein distance of x[x0:x1] and y[y0:y1] if it is <= bound, else some value > bound."""
    n = x1 - x0
    m = y1 - y0
    for j in range(m + 1):
        row[j] = j
    for i in range(1, n + 1):
        diag = row[0]
        row[0] = i
        low = i
        xi = x[x0 + i - 1]
        for j in range(1, m + 1):
            best = diag + (1 if xi != y[y0 + j - 1] else 0)
            if row[j] + 1 < best:
                best = row[j] + 1
            if row[j - 1] + 1 < best:
                best = row[j - 1] + 1
            diag = row[j]
            row[j] = best
            if best < low:
                low = best
        if low > bound:
            return bound + 1
    return row[m]


@njit(cache=True, nogil=True)
def _bit_distance(peq, size, ty, y0, y1, bound):
    """Levenshtein distance of a query of `size` <= 64 characters and the target characters
    ty[y0:y1] if it is <= bound, else some value > bound: Myers' bit-parallel algorithm (one
    machine word per target character, in Hyyrö's form for whole strings). peq[c]: the query
    positions holding character c, as bits."""
    one = np.uint64(1)
    high = one << np.uint64(size - 1)
    pv = ~np.uint64(0)
    mv = np.uint64(0)
    score = size
    for q in range(y0, y1):
        eq = peq[ty[q]]
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        if score - (y1 - q - 1) > bound:  # even matching every remaining character would not do
            return bound + 1
        ph = (ph << one) | one
        mh = mh << one
        pv = mh | ~(xv | ph)
        mv = ph & xv
    return score


@njit(cache=True, nogil=True)
def _nearest_one(qf, x0, x1, qc, qmask, lo, hi, tf, ty, tp, by_length, length_start, holders, holder_length,
                 holder_mask, seen, mark, peq, row):
    """The lowest target id at minimum Levenshtein distance from qf[x0:x1]. qc: its characters as
    indices into the index's chars (-1: none has it); lo[x0 + j]:hi[x0 + j]: the holders of its
    j-th rarest element; seen[y] == mark: y's distance is known; peq: zeros (left as found)."""
    size = x1 - x0
    bits = size <= 64
    if bits:
        for i in range(size):
            if qc[x0 + i] >= 0:
                peq[qc[x0 + i]] |= np.uint64(1) << np.uint64(i)
    best = np.int64(1) << 40
    best_id = np.int64(1) << 40
    done = False
    for j in range(size):
        # the element's holders from the query's length outward, while the length difference alone
        # does not exceed the best distance
        e0, e1 = lo[x0 + j], hi[x0 + j]
        a, b = e0, e1
        while a < b:
            half = (a + b) // 2
            if holder_length[half] < size:
                a = half + 1
            else:
                b = half
        for way in range(2):
            p = a if way == 0 else a - 1
            while e0 <= p < e1 and abs(holder_length[p] - size) <= best:
                y, length, mask = holders[p], holder_length[p], holder_mask[p]
                p += 1 if way == 0 else -1
                # lower bounds: the length difference; characters on one side only (64-bit masks);
                # and, if y holds none of the j elements read before, a bag distance at least j
                # more than its excess length (if it holds one, it was read then: either its
                # distance is known, or a bound put it out of reach for good)
                bound = max(abs(length - size), j + max(length - size, 0), _popcount(qmask & ~mask),
                            _popcount(mask & ~qmask))
                if bound > best or (bound == best and y > best_id) or seen[y] == mark:
                    continue
                seen[y] = mark
                if bits:
                    d = _bit_distance(peq, size, ty, tp[y], tp[y + 1], best)
                else:
                    d = _bounded_distance(qf, x0, x1, tf, tp[y], tp[y + 1], best, row)
                if d < best or (d == best and y < best_id):
                    best, best_id = d, y
        if best <= j:  # j + 1 elements read: every target at distance <= j has been
            done = True
            break
    if bits:
        for i in range(size):
            if qc[x0 + i] >= 0:
                peq[qc[x0 + i]] = 0
    if done:
        return best_id
    # every target holding one of the query's elements has been read or is out of reach (a target
    # out of reach is farther than max(|x|, |y|), so it cannot pass for one below). The others are
    # at max(|x|, |y|): |x| for the lowest id at most as long as the query, else the length of the
    # shortest longer one
    for length in range(1, len(length_start) - 1):
        if max(length, size) > best:
            break
        for r in range(length_start[length], length_start[length + 1]):
            y = by_length[r]
            if seen[y] != mark:
                if max(length, size) < best or y < best_id:
                    best, best_id = max(length, size), y
                break
    return best_id


@njit(cache=True, nogil=True)
def _nearest_range(q0, q1, qf, qp, qc, qmask, lo, hi, tf, ty, tp, by_length, length_start, holders, holder_length,
                   holder_mask, n_chars, longest, out):
    """_nearest_one for queries q0 .. q1 - 1, into out."""
    seen = np.zeros(len(tp) - 1, np.int32)
    peq = np.zeros(n_chars, np.uint64)
    row = np.empty(longest + 2, np.int64)
    for qi in range(q0, q1):
        out[qi] = _nearest_one(qf, qp[qi], qp[qi + 1], qc, qmask[qi], lo, hi, tf, ty, tp, by_length, length_start,
                               holders, holder_length, holder_mask, seen, qi + 1, peq, row)


def nearest_strings(queries: list[str], targets: list[str]) -> np.ndarray:
    """For each query: the index of the first target (in list order) at minimum Levenshtein
    distance; empty target strings never win."""
    return StringIndex(targets).nearest(queries)


def string_index(target: TokenView) -> StringIndex:
    index = target.__dict__.get("_string_index")
    if index is None:
        index = target.__dict__["_string_index"] = StringIndex(target.strings)
    return index


def soft_map(source: TokenView, target: TokenView) -> np.ndarray:
    vocab = target.vocab
    spelled = spelled_as_target(source, target)
    out = np.array([vocab.get(s, -1) for s in spelled], dtype=np.int32)
    todo = [i for i, s in enumerate(spelled) if out[i] < 0 and s]
    if todo:
        nearest = string_index(target).nearest([spelled[i] for i in todo])
        out[todo] = target.canonical[nearest]
    return out


# --- default mode ----------------------------------------------------------------------------

def bytes_to_id(view: TokenView) -> dict[bytes, int]:
    """The id a tokenizer would use for each byte string it has a token for: added tokens before
    model tokens before byte-fallback pieces, then the lowest id (kept on the view once built)."""
    table = view.__dict__.get("_bytes_to_id")
    if table is None:
        rank = np.where(view.added, 0, np.where(view.byte_piece, 2, 1))
        lengths = view.lengths
        ids = [i for i in range(view.size) if lengths[i] > 0 and not view.special[i]]
        table = {}
        for i in sorted(ids, key=lambda i: (rank[i], i), reverse=True):
            table[view.token_bytes(i)] = i
        view.__dict__["_bytes_to_id"] = table
    return table


class FirstToken:
    """The target token a byte string begins with, as far as the string tells.

    The longest ordinary target token (not a byte-fallback piece) that is a prefix of it. Failing
    that: if some ordinary token starts with the whole string (a character cut short, such as the
    first byte of "é"), the target will spell it with one of those and we cannot tell which: -1;
    else the target has no ordinary token for these bytes and spells them with byte pieces: the
    piece of the first byte (-1 where it has none)."""

    def __init__(self, target: TokenView):
        table = bytes_to_id(target)
        self.ordinary = {b: i for b, i in table.items() if not target.byte_piece[i]}
        self.pieces = {b: i for b, i in table.items() if target.byte_piece[i]}
        self.started = {b[:k] for b in self.ordinary for k in range(1, len(b))}
        self.longest = max((len(b) for b in self.ordinary), default=0)

    def __call__(self, data: bytes) -> int:
        for size in range(min(len(data), self.longest), 0, -1):
            hit = self.ordinary.get(data[:size])
            if hit is not None:
                return hit
        if not data or data in self.started:
            return -1
        return self.pieces.get(data[:1], -1)


def first_token(target: TokenView) -> FirstToken:
    lookup = target.__dict__.get("_first_token")
    if lookup is None:
        lookup = target.__dict__["_first_token"] = FirstToken(target)
    return lookup


# The same lookup compiled, for whole vocabularies at once: a byte trie over the target's
# ordinary tokens (first child / next sibling, the root's children in a table of 256).

@njit(cache=True)
def _build_trie(data, ptr, ids):
    """Trie of the byte strings data[ptr[i]:ptr[i+1]] for i in ids, each node's token the id of
    the string that ends there (the first listed wins). Returns (child, sibling, label, token,
    root) with root[b] the node of the one-byte prefix b (-1: none)."""
    capacity = 1
    for i in ids:
        capacity += ptr[i + 1] - ptr[i]
    child = np.full(capacity, -1, np.int32)
    sibling = np.full(capacity, -1, np.int32)
    label = np.zeros(capacity, np.uint8)
    token = np.full(capacity, -1, np.int32)
    root = np.full(256, -1, np.int32)
    nodes = 0
    for i in ids:
        node = -1
        for q in range(ptr[i], ptr[i + 1]):
            b = data[q]
            if node < 0:
                nxt = root[b]
                if nxt < 0:
                    nxt = nodes
                    nodes += 1
                    label[nxt] = b
                    root[b] = nxt
            else:
                nxt = child[node]
                while nxt >= 0 and label[nxt] != b:
                    nxt = sibling[nxt]
                if nxt < 0:
                    nxt = nodes
                    nodes += 1
                    label[nxt] = b
                    sibling[nxt] = child[node]
                    child[node] = nxt
            node = nxt
        if node >= 0 and token[node] < 0:
            token[node] = i
    return child[:nodes], sibling[:nodes], label[:nodes], token[:nodes], root


@njit(cache=True, nogil=True)
def _first_of(child, sibling, label, token, root, pieces, lead, data, q0, q1):
    """FirstToken for the bytes `lead` (if >= 0) + data[q0:q1]; -2 where the answer is -1
    because ordinary tokens continue these bytes (FirstToken.started)."""
    node = -1
    best = -1
    size = q1 - q0 + (1 if lead >= 0 else 0)
    walked = 0
    for r in range(size):
        b = lead if (lead >= 0 and r == 0) else data[q0 + r - (1 if lead >= 0 else 0)]
        if node < 0:
            nxt = root[b]
        else:
            nxt = child[node]
            while nxt >= 0 and label[nxt] != b:
                nxt = sibling[nxt]
        if nxt < 0:
            break
        node = nxt
        walked += 1
        if token[node] >= 0:
            best = token[node]
    if best >= 0:
        return best
    if size == 0:
        return -1
    if walked == size:
        return -2  # a proper prefix of some ordinary token (a whole token would have been found)
    first = lead if lead >= 0 else data[q0]
    return pieces[first]


@njit(cache=True, nogil=True)
def _firsts(child, sibling, label, token, root, pieces, lead, data, starts, ends):
    out = np.empty(len(starts), np.int32)
    for q in range(len(starts)):
        out[q] = _first_of(child, sibling, label, token, root, pieces, lead, data, starts[q], ends[q])
    return out


@njit(cache=True, nogil=True)
def _suffixes(ptr, ids):
    """(starts, ends) of every proper suffix data[ptr[x]+k : ptr[x+1]], 1 <= k < len(x), x in ids."""
    total = 0
    for x in ids:
        total += max(ptr[x + 1] - ptr[x] - 1, 0)
    starts = np.empty(total, np.int64)
    ends = np.empty(total, np.int64)
    n = 0
    for x in ids:
        for q in range(ptr[x] + 1, ptr[x + 1]):
            starts[n] = q
            ends[n] = ptr[x + 1]
            n += 1
    return starts, ends


class ByteTrie:
    """FirstToken over many byte strings at once, in compiled code (the same answers)."""

    def __init__(self, target: TokenView):
        table = bytes_to_id(target)
        ordinary = np.array(sorted(i for i in table.values() if not target.byte_piece[i]), dtype=np.int64)
        self.arrays = _build_trie(target.data, target.ptr, ordinary)
        self.pieces = np.full(256, -1, np.int32)
        for data, i in table.items():
            if target.byte_piece[i]:
                self.pieces[data[0]] = i

    def firsts(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, lead: int = -1) -> np.ndarray:
        """Per string data[starts[q]:ends[q]] (after the byte `lead` if >= 0): the FirstToken answer,
        -2 where FirstToken says -1 because ordinary target tokens continue the bytes."""
        return _firsts(*self.arrays, self.pieces, lead, data, np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def byte_trie(target: TokenView) -> ByteTrie:
    trie = target.__dict__.get("_byte_trie")
    if trie is None:
        trie = target.__dict__["_byte_trie"] = ByteTrie(target)
    return trie


def _special_map(source: TokenView, target: TokenView, x: int) -> int:
    if x == source.eos_id and target.eos_id >= 0:
        return target.eos_id
    if x == source.bos_id and target.bos_id >= 0:
        return target.bos_id
    return target.unk_id if x == source.unk_id else -1


def _special_maps(source: TokenView, target: TokenView, out: np.ndarray) -> np.ndarray:
    """Ids without text (special or empty) in `out` set by _special_map; the others' mask."""
    text = ~source.special & (source.lengths > 0)
    for x in np.flatnonzero(~text):
        out[x] = _special_map(source, target, int(x))
    return text


def default_map(source: TokenView, target: TokenView) -> np.ndarray:
    out = np.full(source.size, -1, dtype=np.int32)
    ids = np.flatnonzero(_special_maps(source, target, out))
    hits = byte_trie(target).firsts(source.data, source.ptr[ids], source.ptr[ids + 1])
    # bytes the target cannot spell at all (no token, no piece): its unknown token
    out[ids] = np.where(hits == -2, -1, np.where(hits == -1, target.unk_id, hits))
    return out


def continuation_table(source: TokenView, target: TokenView) -> np.ndarray:
    """int32 aligned with source.data: entry source.ptr[x] + k (1 <= k < len(x)) is the target token
    the rest of x's bytes after its first k would start with (-1: none); entry ptr[x] is unused."""
    def build():
        out = np.full(len(source.data), -1, dtype=np.int32)
        starts, ends = _suffixes(source.ptr, np.arange(source.size, dtype=np.int64))
        out[starts] = np.maximum(byte_trie(target).firsts(source.data, starts, ends), -1)
        return out
    return cached("continuation", source, target, len(source.data), build)


def dummy_prefix_table(source: TokenView, target: TokenView) -> np.ndarray:
    """int32 [source.size]: the target token that a space followed by source token x's bytes would
    start with (for a target that puts a dummy space in front of the text and a source that does
    not); special tokens as in the default map."""
    def build():
        out = np.full(source.size, -1, dtype=np.int32)
        ids = np.flatnonzero(_special_maps(source, target, out))
        out[ids] = np.maximum(byte_trie(target).firsts(source.data, source.ptr[ids], source.ptr[ids + 1], 0x20), -1)
        return out
    return cached("dummy", source, target, source.size, build)
