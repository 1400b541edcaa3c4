"""Vocabulary maps: every source token id -> a target token id (or -1).

Modes:
- "reference-hard": the target token with exactly the source token's string, its space marker
  spelled as the target's (FuseLLM's hard mode); -1 where there is none.
- "reference-soft": FuseLLM's `find_best_mapping`: that exact string if the target has it, else the
  target token whose string is nearest by Levenshtein distance over code points, the lowest id
  winning ties (the original scans the target vocabulary in id order and keeps the first minimum).
  The original computes all |V_s| x |V_t| distances (827 s on 2 processes for 50k x 32k); we find
  the same token by scanning targets in order of growing length difference and skipping every
  target whose lower bound (length difference; characters present on one side only, through a
  64-bit character mask) already exceeds the best distance found, in compiled parallel code.
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
bytes are already committed (default.py) or that follow a target's dummy space.

Maps are cached on disk, keyed by both views' hashes and the mode, in $FUSION_CACHE_DIR (default
~/.cache/fusion), written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from numba import njit, prange

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


@njit(cache=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True)
def _char_masks(flat, ptr):
    """Per string: a 64-bit set of (hashed) characters it contains."""
    n = len(ptr) - 1
    masks = np.zeros(n, np.uint64)
    for s in range(n):
        mask = np.uint64(0)
        for q in range(ptr[s], ptr[s + 1]):
            bit = ((np.uint64(flat[q]) * np.uint64(2654435761)) >> np.uint64(13)) & np.uint64(63)
            mask |= np.uint64(1) << bit
        masks[s] = mask
    return masks


@njit(cache=True)
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


@njit(parallel=True, cache=True)
def _nearest(qf, qp, qmask, tf, tp, tmask, by_length, length_start, longest):
    """For each query string: the lowest target id at minimum Levenshtein distance.

    by_length: target ids sorted by (length, id); length_start[L]: where length L begins."""
    nq = len(qp) - 1
    out = np.full(nq, -1, np.int32)
    max_len = len(length_start) - 2
    for q in prange(nq):
        row = np.empty(longest + 2, np.int64)
        x0 = qp[q]
        x1 = qp[q + 1]
        size = x1 - x0
        best = np.int64(1) << 40
        best_id = np.int64(1) << 40
        for delta in range(max_len + size + 1):
            if delta > best:
                break
            for side in range(2):
                if side == 1 and delta == 0:
                    continue
                length = size + delta if side == 0 else size - delta
                if length < 0 or length > max_len:
                    continue
                for r in range(length_start[length], length_start[length + 1]):
                    y = by_length[r]
                    bound = delta
                    only_left = _popcount(qmask[q] & ~tmask[y])
                    only_right = _popcount(tmask[y] & ~qmask[q])
                    if only_left > bound:
                        bound = only_left
                    if only_right > bound:
                        bound = only_right
                    if bound > best or (bound == best and y > best_id):
                        continue
                    d = _bounded_distance(qf, x0, x1, tf, tp[y], tp[y + 1], best, row)
                    if d < best or (d == best and y < best_id):
                        best = d
                        best_id = y
        out[q] = best_id
    return out


def nearest_strings(queries: list[str], targets: list[str]) -> np.ndarray:
    """For each query: the index of the first target (in list order) at minimum Levenshtein
    distance; empty target strings never win."""
    qf, qp = codepoints(queries)
    tf, tp = codepoints(targets)
    lengths = np.diff(tp)
    usable = np.flatnonzero(lengths > 0)
    by_length = usable[np.lexsort((usable, lengths[usable]))].astype(np.int64)
    max_len = int(lengths.max(initial=0))
    length_start = np.searchsorted(lengths[by_length], np.arange(max_len + 2)).astype(np.int64)
    longest = int(max(max_len, np.diff(qp).max(initial=0)))
    return _nearest(qf, qp, _char_masks(qf, qp), tf, tp, _char_masks(tf, tp), by_length, length_start, longest)


def soft_map(source: TokenView, target: TokenView) -> np.ndarray:
    vocab = target.vocab
    spelled = spelled_as_target(source, target)
    out = np.array([vocab.get(s, -1) for s in spelled], dtype=np.int32)
    todo = [i for i, s in enumerate(spelled) if out[i] < 0 and s]
    if todo:
        nearest = nearest_strings([spelled[i] for i in todo], target.strings)
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


def _special_map(source: TokenView, target: TokenView, x: int) -> int:
    if x == source.eos_id and target.eos_id >= 0:
        return target.eos_id
    if x == source.bos_id and target.bos_id >= 0:
        return target.bos_id
    return target.unk_id if x == source.unk_id else -1


def default_map(source: TokenView, target: TokenView) -> np.ndarray:
    first = first_token(target)
    out = np.full(source.size, -1, dtype=np.int32)
    for x in range(source.size):
        if source.special[x] or source.lengths[x] == 0:
            out[x] = _special_map(source, target, x)
            continue
        data = source.token_bytes(x)
        hit = first(data)
        if hit < 0 and data not in first.started:
            hit = target.unk_id  # bytes the target cannot spell at all: its unknown token
        out[x] = hit
    return out


def continuation_table(source: TokenView, target: TokenView) -> np.ndarray:
    """int32 aligned with source.data: entry source.ptr[x] + k (1 <= k < len(x)) is the target token
    the rest of x's bytes after its first k would start with (-1: none); entry ptr[x] is unused."""
    def build():
        first = first_token(target)
        out = np.full(len(source.data), -1, dtype=np.int32)
        for x in range(source.size):
            data = source.token_bytes(x)
            base = int(source.ptr[x])
            for k in range(1, len(data)):
                out[base + k] = first(data[k:])
        return out
    return cached("continuation", source, target, len(source.data), build)


def dummy_prefix_table(source: TokenView, target: TokenView) -> np.ndarray:
    """int32 [source.size]: the target token that a space followed by source token x's bytes would
    start with (for a target that puts a dummy space in front of the text and a source that does
    not); special tokens as in the default map."""
    def build():
        first = first_token(target)
        out = np.full(source.size, -1, dtype=np.int32)
        for x in range(source.size):
            if source.special[x] or source.lengths[x] == 0:
                out[x] = _special_map(source, target, x)
            else:
                out[x] = first(b" " + source.token_bytes(x))
        return out
    return cached("dummy", source, target, source.size, build)
