"""The alignment modes (`align.mode` of a run spec), each resolved once into a Mode:

    mode = resolve("reference-soft")
    table = mode.vocab_map(source_view, target_view)   # source id -> target id (vocab.py builds it)
    mode.warm(source_view, target_view)                 # tables built before threads share the views
    out = mode.align(...)                               # the mode's kernel on placed tokens

- "default" (default.py): shared text boundaries, bytes, next-token fallback, tail kept;
- "reference-hard" / "reference-soft" (reference.py): the paper's DTW alignment, exactly; hard
  maps tokens by exact spelling, soft through the paper's vocabulary table. The alignment
  fixture and its checker call them "hard" and "soft" (`resolve_reference` takes both names).

blocks.py does what every mode shares (checking the inputs, placing the tokens in the text,
the rows and their stats); a mode only says how its table is built and which kernel fills rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import FusionError
from ..sparse import SparseRows
from .default import CONDITIONED, CONTINUED, DUMMY, SHARED, SPECIAL, default_blocks
from .reference import DISTRIBUTION, EMPTY, ONE_HOT, first_token_match, reference_blocks
from .tokens import TokenView
from .vocab import cached, continuation_table, default_map, dummy_prefix_table, hard_map, soft_map

DTW_WIDTH = 32  # band half-width in tokens around the text alignment (dtw.py widens it when needed)


@dataclass
class Filled:
    """A mode's rows, padded [rows, k], and how each row was filled."""

    ids: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray
    tails: np.ndarray
    how: np.ndarray  # per row: one of `ways`' codes
    ways: dict[str, int]  # the names of the codes, for the stats
    covered: int  # rows that received a source distribution


@dataclass(frozen=True)
class Mode:
    name: str
    build_map: Callable[[TokenView, TokenView], np.ndarray]
    warm: Callable[[TokenView, TokenView], None]
    fill: Callable[..., Filled]
    fixture_name: str | None = None  # a reference mode's name in the alignment fixture ("hard", "soft")
    uses_continuations: bool = False  # whether fill reads the source's continuation rows

    def vocab_map(self, source: TokenView, target: TokenView) -> np.ndarray:
        """int32 [source.size]: target id per source id, -1 where there is none (cached on disk)."""
        return cached(self.name, source, target, source.size, lambda: self.build_map(source, target))


# ---- default ------------------------------------------------------------------------------------
def _warm_default(source: TokenView, target: TokenView) -> None:
    continuation_table(source, target)
    dummy_prefix_table(source, target)


def _fill_default(source, target, mapping, t_tokens, t_ptr, t_start, t_len, t_exact, s_tokens, s_ptr, s_start, s_len,
                  s_exact, topk_ids, topk_logprobs, tail, continuations=None) -> Filled:
    depth, rows = continuations if continuations is not None else (np.zeros(len(s_tokens), np.int64), None)
    first = np.cumsum(depth) - depth
    if rows is None:
        rows = SparseRows.from_topk(np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32), np.zeros(0, np.float32))
    ids, logprobs, counts, tails, how = default_blocks(
        t_tokens, t_ptr, t_start, t_len, t_exact, s_tokens, s_ptr, s_start, s_len, s_exact, topk_ids, topk_logprobs,
        tail, source.data, source.ptr, mapping, continuation_table(source, target), dummy_prefix_table(source, target),
        np.asarray(depth, np.int64), first.astype(np.int64), rows.ptr, rows.ids.astype(np.int64),
        rows.logprobs.astype(np.float32), rows.tail.astype(np.float32))
    ways = {"shared": SHARED, "conditioned": CONDITIONED, "continued": CONTINUED, "dummy": DUMMY, "special": SPECIAL}
    return Filled(ids, logprobs, counts, tails, how, ways, int(np.sum(counts > 0)))


# ---- reference (the paper's) --------------------------------------------------------------------
def _warm_reference(source: TokenView, target: TokenView) -> None:
    HARD.vocab_map(source, target)
    source.stripped_codepoints, target.stripped_codepoints, target.canonical, target.vocab


def _fill_reference(soft: bool):
    def fill(source, target, mapping, t_tokens, t_ptr, t_start, t_len, t_exact, s_tokens, s_ptr, s_start, s_len,
             s_exact, topk_ids, topk_logprobs, tail, continuations=None) -> Filled:
        # the paper's alignment pairs whole tokens: continuation rows are not used
        hard = HARD.vocab_map(source, target) if soft else mapping
        soft_map_ = mapping if soft else None
        first = _first_matches(source, target, s_tokens, s_ptr, t_tokens, t_ptr, soft_map_)
        matched = hard if soft_map_ is None else soft_map_
        ids, logprobs, counts, how = reference_blocks(
            t_tokens, t_ptr, t_start, t_len, s_tokens, s_ptr, s_start, s_len, topk_ids, topk_logprobs,
            *source.stripped_codepoints, *target.stripped_codepoints, hard, matched, matched, target.canonical,
            first, DTW_WIDTH)
        tails = np.where(counts == 0, 1.0, 0.0).astype(np.float32)  # the paper drops the mass beyond the top-k
        ways = {"distribution": DISTRIBUTION, "one_hot": ONE_HOT, "empty": EMPTY}
        # a reference one-hot is no source distribution: coverage counts distributions only
        return Filled(ids, logprobs, counts, tails, how, ways, int(np.sum(how == DISTRIBUTION)))

    return fill


_spellings: dict[tuple[str, str], dict[str, int]] = {}


def _first_matches(source: TokenView, target: TokenView, s_tokens, s_ptr, t_tokens, t_ptr, soft) -> np.ndarray:
    """Per block: the paper's position-0 special case for a byte-level source (reference.py)."""
    def lookup(string):  # the soft map's target string for the source token spelled `string`
        key = (source.hash, target.hash)
        if key not in _spellings:
            _spellings[key] = {s.replace(source.marker, target.marker) if source.marker else s: i
                               for i, s in enumerate(source.strings) if s}
        x = _spellings[key].get(string)
        return target.strings[soft[x]] if x is not None and soft[x] >= 0 else None

    out = np.full(len(t_ptr) - 1, -1, np.int8)
    for blk in range(len(out)):
        if t_ptr[blk + 1] > t_ptr[blk] and s_ptr[blk + 1] > s_ptr[blk]:
            out[blk] = first_token_match(source.strings[s_tokens[s_ptr[blk]]], target.strings[t_tokens[t_ptr[blk]]],
                                         source.marker, target.marker, source.byte_level,
                                         None if soft is None else lookup)
    return out


# ---- the registry ---------------------------------------------------------------------------------
DEFAULT = Mode("default", default_map, _warm_default, _fill_default, uses_continuations=True)
HARD = Mode("reference-hard", hard_map, _warm_reference, _fill_reference(soft=False), fixture_name="hard")
SOFT = Mode("reference-soft", soft_map, _warm_reference, _fill_reference(soft=True), fixture_name="soft")
MODES = {m.name: m for m in (DEFAULT, HARD, SOFT)}
REFERENCE = {m.fixture_name: m for m in MODES.values() if m.fixture_name}  # "hard", "soft" -> the mode


def resolve(mode: str | Mode, where: str = "align") -> Mode:
    """The Mode named `mode` (a Mode is passed through); FusionError naming the known ones."""
    if isinstance(mode, Mode):
        return mode
    if mode not in MODES:
        raise FusionError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
    return MODES[mode]


def resolve_reference(mode: str | Mode, where: str = "align-fixture") -> Mode:
    """A reference mode by its spec name (reference-hard) or its fixture name (hard)."""
    found = mode if isinstance(mode, Mode) else REFERENCE.get(mode) or MODES.get(mode)
    if found is None or found.fixture_name is None:
        names = [m.name for m in REFERENCE.values()] + list(REFERENCE)
        raise FusionError(f"{where}: mode {getattr(mode, 'name', mode)!r} is not one of {', '.join(names)}")
    return found


def vocab_map(source: TokenView, target: TokenView, mode: str | Mode) -> np.ndarray:
    """int32 [source.size]: target id per source id, -1 where there is none (see vocab.py)."""
    return resolve(mode, "vocab_map").vocab_map(source, target)
