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


def place(view: TokenView, ids: np.ndarray, text: bytes, what: str) -> tuple[int, np.ndarray]:
    """(prefix, lengths): whether the tokens carry a dummy space in front of `text` (0 or 1) and
    each token's length in bytes. `what` names the sequence in error messages."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= view.size):
        bad = int(ids[(ids < 0) | (ids >= view.size)][0])
        raise FusionError(f"{what}: token id {bad} is outside the vocabulary of {view.name or 'the tokenizer'} "
                          f"({view.size} ids)")
    stream = gather_bytes(view.data, view.ptr, ids)
    raw = np.frombuffer(text, dtype=np.uint8)
    if len(stream) == len(raw) and np.array_equal(stream, raw):
        return 0, view.lengths[ids].astype(np.int64)
    if len(stream) == len(raw) + 1 and stream[0] == 0x20 and np.array_equal(stream[1:], raw):
        return 1, view.lengths[ids].astype(np.int64)
    if (view.unk_id >= 0 and np.any(ids == view.unk_id)) or np.any(view.special[ids]):
        slow = _regex_lengths(view, ids, text)
        if slow is not None:
            return slow
    at = _first_difference(stream, raw)
    shifted = _first_difference(stream[1:], raw) if len(stream) and stream[0] == 0x20 else -1
    if shifted > at:
        at_stream, at_text = shifted + 1, shifted
    else:
        at_stream, at_text = at, at
    raise FusionError(
        f"{what}: the tokens do not spell the block's text ({len(stream)} bytes from the tokens, {len(raw)} in "
        f"the text); first difference at text byte {at_text}: tokens give {_excerpt(stream.tobytes(), at_stream)}, "
        f"text has {_excerpt(text, at_text)}. Were they tokenized from this text, and does the tokenizer "
        "normalize it (NFC, lowercase)? Normalize the corpus the same way before splitting."
    )


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
