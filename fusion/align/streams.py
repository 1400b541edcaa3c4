"""Where each token of a sequence sits in its text.

A sequence of ids stands for the concatenation of its tokens' bytes (tokens.py). For the
tokenizers we support that concatenation is the text itself, or the text with one space in front
(the "dummy prefix" SentencePiece-style tokenizers add). `place` finds out which, per block, and
gives every token its byte span in TEXT coordinates: the first token of a dummy-prefixed sequence
starts at -1. Anything else (a normalizer that changed the text, tokens of another text) is a
FusionError naming the block and the first differing byte.

Special tokens (BOS, EOS, pad) stand for no text. Two rarer cases take a slower path: an unknown
token (`<unk>`, where a tokenizer without byte fallback met a character it cannot spell) covers
whatever text lies between its neighbours, and a special token whose literal spelling occurs in
the text at that point (a text containing "<|endoftext|>" tokenized with special tokens parsed)
covers that spelling; a SentencePiece-style tokenizer then puts a dummy space after it too, which
the token after it keeps in its bytes but not in the text. (Tokenizing with
split_special_tokens=True avoids this case altogether.)

Tokenizers that normalize the text before cutting it (strip or collapse spaces, NFC, NFKC,
lowercase) spell the NORMALIZED text, not the text. `locate` then checks the tokens against the
tokenizer's own normalization of the text (TokenView.normalized) and carries their spans over to
the text by a minimum-edit alignment of the two byte strings: every text byte belongs to one
token (a collapsed run of spaces to the token holding its first space), and a token is `exact`
where its span is byte for byte its own spelling. The aligners use inexact spans only where they
need no byte-level detail (a boundary at the token's start).
"""

from __future__ import annotations

import re

import numpy as np
from numba import njit

from ..errors import FusionError
from .tokens import TokenView


@njit(cache=True)
def gather_bytes(data, ptr, ids):
    """The bytes ids stand for, back to back (uint8)."""
    total = 0
    for t in ids:
        total += ptr[t + 1] - ptr[t]
    out = np.empty(total, np.uint8)
    n = 0
    for t in ids:
        for q in range(ptr[t], ptr[t + 1]):
            out[n] = data[q]
            n += 1
    return out


def _excerpt(raw: bytes, at: int) -> str:
    return repr(raw[max(0, at - 20) : at + 20].decode("utf-8", "replace"))


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _regex_lengths(view: TokenView, ids: np.ndarray, text: bytes) -> tuple[int, np.ndarray] | None:
    """Slow path: unknown tokens match any text, special tokens their literal spelling or nothing.
    A tokenizer that parsed a special token out of the text starts the text after it afresh, with
    a dummy space of its own: a space at the start of the token after a special one may be absent
    from the text."""
    parts = []
    after_special = False
    for q, t in enumerate(ids):
        t = int(t)
        data = view.token_bytes(t)
        if t == view.unk_id:
            parts.append(b"(?P<t%d>.+?)" % q)
        elif view.special[t]:  # its spelling, markers read as spaces where the tokenizer matched it
            spellings = {view.strings[t], view.strings[t].replace(view.marker, " ") if view.marker else ""} - {""}
            parts.append(b"(?P<t%d>(?:%s)?)" % (q, b"|".join(re.escape(x.encode("utf-8")) for x in spellings)))
        elif after_special and data.startswith(b" "):
            parts.append(b"(?P<t%d> ?%s)" % (q, re.escape(data[1:])))
        else:
            parts.append(re.escape(data))
        after_special = bool(view.special[t]) and t != view.unk_id
    pattern = re.compile(b"".join(parts), re.DOTALL)
    for prefix in (0, 1):
        match = pattern.fullmatch(b" " * prefix + text)
        if match:
            lengths = view.lengths[ids].astype(np.int64)
            for name, value in match.groupdict().items():
                lengths[int(name[1:])] = len(value)
            return prefix, lengths
    return None


def _strict(view: TokenView, ids: np.ndarray, stream: np.ndarray, text: bytes) -> tuple[int, np.ndarray] | None:
    """(prefix, lengths) where the tokens spell the text itself (prefix 1: after a dummy space)."""
    raw = np.frombuffer(text, dtype=np.uint8)
    if len(stream) == len(raw) and np.array_equal(stream, raw):
        return 0, view.lengths[ids].astype(np.int64)
    if len(stream) == len(raw) + 1 and stream[0] == 0x20 and np.array_equal(stream[1:], raw):
        return 1, view.lengths[ids].astype(np.int64)
    if (view.unk_id >= 0 and np.any(ids == view.unk_id)) or np.any(view.special[ids]):
        return _regex_lengths(view, ids, text)
    return None


def _checked(view: TokenView, ids, what: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= view.size):
        bad = int(ids[(ids < 0) | (ids >= view.size)][0])
        raise FusionError(f"{what}: token id {bad} is outside the vocabulary of {view.name or 'the tokenizer'} "
                          f"({view.size} ids)")
    return ids


def place(view: TokenView, ids: np.ndarray, text: bytes, what: str) -> tuple[int, np.ndarray]:
    """(prefix, lengths) for tokens that spell `text` itself: whether they carry a dummy space in
    front of it (0 or 1) and each token's length in bytes. `what` names the sequence in error
    messages."""
    ids = _checked(view, ids, what)
    stream = gather_bytes(view.data, view.ptr, ids)
    found = _strict(view, ids, stream, text)
    if found is None:
        raise _mismatch(view, stream, text, None, what)
    return found


def locate(view: TokenView, ids: np.ndarray, text: bytes, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, exact) of every token in text coordinates: the tokens spell the text, or
    the text as the tokenizer normalizes it (module doc). FusionError where they spell neither."""
    ids = _checked(view, ids, what)
    stream = gather_bytes(view.data, view.ptr, ids)
    found = _strict(view, ids, stream, text)
    if found is not None:
        return spans(*found), found[1], np.ones(len(ids), dtype=np.bool_)
    normalized = None
    if view.normalized is not None:
        normalized = np.frombuffer(view.normalized(text.decode("utf-8", "surrogateescape")), dtype=np.uint8)
        agrees = (len(stream) == len(normalized) and np.array_equal(stream, normalized)) or (
            len(stream) == len(normalized) + 1 and stream[0] == 0x20 and np.array_equal(stream[1:], normalized))
        if agrees:
            consumed, matched = byte_alignment(stream, np.frombuffer(text, dtype=np.uint8))
            return normalized_spans(view.ptr, ids, consumed, matched, len(text), bool(len(stream) and stream[0] == 0x20))
    raise _mismatch(view, stream, text, normalized, what)


def _mismatch(view: TokenView, stream: np.ndarray, text: bytes, normalized, what: str) -> FusionError:
    """The error for tokens that spell neither the text nor its normalization: what each side
    has at the first difference, with byte counts of exactly the two sequences compared."""
    reference = np.frombuffer(text, dtype=np.uint8) if normalized is None else normalized
    name = "the text" if normalized is None else "the text as the tokenizer normalizes it"
    compared = stream
    dummy = ""
    at = _first_difference(stream, reference)
    if len(stream) and stream[0] == 0x20 and _first_difference(stream[1:], reference) > at:
        compared = stream[1:]  # the tokenizer's own leading space is not the difference
        at = _first_difference(compared, reference)
        dummy = " after the space the tokenizer puts in front"
    hint = "Were they tokenized from this text, by this tokenizer?"
    return FusionError(
        f"{what}: the tokens do not spell the block's text: {len(compared)} bytes from the tokens{dummy}, "
        f"{len(reference)} in {name}; first difference at byte {at}: tokens give "
        f"{_excerpt(compared.tobytes(), at)}, {name} has {_excerpt(reference.tobytes(), at)}. {hint}"
    )


@njit(cache=True, nogil=True)
def byte_alignment(stream, text, slack=8):
    """A minimum-edit alignment of the bytes the tokens spell (`stream`) with the text's (a
    substitution costs as much as a deletion and an insertion, so that equal bytes are matched
    wherever they can be: a longest common subsequence). Returns
    for every stream byte the text position where the alignment consumes it and whether it is
    matched there by an equal byte. Of equally short alignments it takes the one that matches a
    byte before deleting its repeats: a collapsed run of spaces keeps its first space, so the
    token holding it starts where the run does, as a target that spells the run as one token
    ("    " then "if") has its boundaries (the tokenizers' own offsets start it at the last
    space instead, where a target splitting "   " + " if" has its second one). Computed
    in a band around the diagonal wide enough for the length difference plus `slack`."""
    m, n = len(stream), len(text)
    lo = min(0, m - n) - slack  # band: lo <= j - i <= hi
    hi = max(0, m - n) + slack
    width = hi - lo + 1
    big = np.int32(1 << 29)
    # moves into cell (i, j): 1 diagonal, 2 from (i-1, j) (text byte deleted), 3 from (i, j-1) (stream byte inserted)
    move = np.zeros((n + 1, width), np.uint8)
    prev = np.full(width, big, np.int32)
    cur = np.full(width, big, np.int32)
    for i in range(n + 1):
        for b in range(width):
            cur[b] = big
        for b in range(width):
            j = i + lo + b
            if j < 0 or j > m:
                continue
            if i == 0 and j == 0:
                cur[b] = 0
                continue
            # ties go to the deletion, then the diagonal: walked back from the end, that puts a
            # deleted byte after the equal byte it repeats (a run of spaces keeps its first)
            best = big
            way = 0
            if i > 0 and b + 1 < width and prev[b + 1] + 1 < best:
                best, way = prev[b + 1] + 1, 2
            if i > 0 and j > 0:
                c = prev[b] + (0 if text[i - 1] == stream[j - 1] else 2)
                if c < best:
                    best, way = c, 1
            if j > 0 and b > 0 and cur[b - 1] + 1 < best:
                best, way = cur[b - 1] + 1, 3
            cur[b] = best
            move[i, b] = way
        prev, cur = cur, prev
    consumed = np.zeros(m, np.int64)
    matched = np.zeros(m, np.bool_)
    i, j = n, m
    while i > 0 or j > 0:
        b = j - i - lo
        way = move[i, b]
        if way == 1:
            i -= 1
            j -= 1
            consumed[j] = i
            matched[j] = text[i] == stream[j]
        elif way == 2:
            i -= 1
        else:
            j -= 1
            consumed[j] = i
    return consumed, matched


@njit(cache=True, nogil=True)
def normalized_spans(vptr, ids, consumed, matched, n, leading_space):
    """Token spans in text coordinates from a byte alignment (byte_alignment): a token starts
    where its first byte is consumed, the first one at 0 (or at -1 if its first byte is a space
    the text does not have: the dummy prefix); every text byte up to the next token's start is
    its. exact: the span is the token's own bytes, all matched. leading_space: the stream starts
with a space."""
    q_count = len(ids)
    starts = np.zeros(q_count, np.int64)
    lengths = np.zeros(q_count, np.int64)
    exact = np.zeros(q_count, np.bool_)
    m = len(consumed)
    first = np.zeros(q_count + 1, np.int64)  # each token's first byte in the stream
    for q in range(q_count):
        first[q + 1] = first[q] + vptr[ids[q] + 1] - vptr[ids[q]]
    dummy = leading_space and m > 0 and not matched[0] and consumed[0] == 0 and (m == 1 or consumed[1] == 0)
    for q in range(q_count):
        if first[q] >= m:
            starts[q] = n
        elif q == 0 or first[q] == 0:
            starts[q] = -1 if dummy else 0
        else:
            starts[q] = consumed[first[q]]
    for q in range(q_count):
        end = n if q + 1 == q_count else starts[q + 1]
        if q + 1 < q_count and first[q + 1] == 0:
            end = starts[q + 1]  # tokens before the first byte (BOS) stand for nothing
        lengths[q] = max(end - starts[q], 0)
        size = first[q + 1] - first[q]
        ok = lengths[q] == size
        lead = 1 if (dummy and starts[q] == -1 and size > 0) else 0
        for r in range(first[q] + lead, first[q + 1]):
            if not matched[r]:
                ok = False
        exact[q] = ok
    return starts, lengths, exact


def spans(prefix: int, lengths: np.ndarray) -> np.ndarray:
    """Start of every token in text coordinates (the dummy space, if any, sits at -1)."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts - prefix


@njit(cache=True, nogil=True)
def block_prefixes(data, vptr, ids, id_ptr, text, text_ptr):
    """Per block: 0 if the tokens spell the text, 1 if they spell a space and then the text,
    -1 otherwise (the slow path then looks closer)."""
    blocks = len(id_ptr) - 1
    out = np.full(blocks, -1, np.int8)
    for blk in range(blocks):
        size = 0
        for q in range(id_ptr[blk], id_ptr[blk + 1]):
            size += vptr[ids[q] + 1] - vptr[ids[q]]
        t0 = text_ptr[blk]
        shift = size - (text_ptr[blk + 1] - t0)
        if shift != 0 and shift != 1:
            continue
        pos = -shift  # position in the text of the next token byte (-1: the dummy space)
        ok = True
        for q in range(id_ptr[blk], id_ptr[blk + 1]):
            for c in range(vptr[ids[q]], vptr[ids[q] + 1]):
                if pos < 0:
                    ok = data[c] == 0x20
                else:
                    ok = data[c] == text[t0 + pos]
                pos += 1
                if not ok:
                    break
            if not ok:
                break
        if ok:
            out[blk] = shift
    return out


@njit(cache=True, nogil=True)
def block_starts(lengths, id_ptr, prefixes):
    """Start of every token in its block's text coordinates (see `spans`)."""
    starts = np.empty(len(lengths), np.int64)
    for blk in range(len(id_ptr) - 1):
        pos = -np.int64(prefixes[blk])
        for q in range(id_ptr[blk], id_ptr[blk + 1]):
            starts[q] = pos
            pos += lengths[q]
    return starts


# Texts every tokenizer we align must spell (itself or through its normalizer): runs of spaces,
# leading and trailing space, tabs and newlines, code, digits, accents (composed and not), CJK.
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "  Two  spaces,   three   spaces; a tab\there and\n\nnew lines\r\n end  ",
    "def f(x):\n    return {'a': [1, 2]}  # 2023-12-02\n",
    "caf\u00e9 cafe\u0301 na\u00efve \u00c5ngstr\u00f6m \u4f60\u597d\uff0c\u4e16\u754c",
)


def check_placeable(tokenizer, view: TokenView, name: str) -> None:
    """FusionError naming the model and an example if the tokenizer's tokens of some probe text
    spell neither the text nor its normalization (`locate`): alignment could never place them."""
    for probe in PROBES:
        ids = _checked(view, tokenizer(probe, add_special_tokens=False, split_special_tokens=True)["input_ids"],
                       f"model '{name}'")
        try:
            locate(view, ids, probe.encode("utf-8"), f"model '{name}'")
        except FusionError:
            spelled = gather_bytes(view.data, view.ptr, ids).tobytes().decode("utf-8", "replace")
            raise FusionError(
                f"model '{name}': its tokens of the probe text {_short(probe)} spell {_short(spelled)}, not the "
                f"text: this tokenizer cannot be aligned (it drops or changes characters)"
            ) from None


def _short(text: str, chars: int = 40) -> str:
    return repr(text if len(text) <= chars else text[:chars] + "...")
