"""Aligning a source model's distributions to the target's tokens, many blocks at a time.

Inputs follow the project's conventions: blocks of text; each side's tokens of every block back
to back with int64 [blocks+1] offsets (`*_ptr`); the source's rows (fusion/sparse.py: row i is the
distribution over source token i given BOS and the tokens before it) as dense top-k arrays
[source rows, k] of natural-log probabilities, plus the mass outside the top-k (`source_tail`).
The result is a SparseRows on the target's rows, ids in the target vocabulary.

Modes (modes.py: `mode` is a name or a Mode): "default" (default.py), "reference-hard" and
"reference-soft" (reference.py, the paper's alignment shifted into our row convention). Every mode first checks that both token sequences
spell the block's text (streams.py) and raises FusionError naming the block otherwise. No
tokenizer offsets are needed: where each token sits in the text follows from its bytes.

`source_continuations` (optional): (depth per source row, SparseRows of its continuation rows,
fusion/continuations.py), which the default mode uses at boundaries inside a source token.

Output rows: ids in the target vocabulary, log-probabilities (default: most probable first;
reference: in the source's top-k order), tail = mass not listed. A row without entries means
"no distribution" (tail 1); training falls back to the one-hot on the row's own token. Top-k ids
below 0 are padding and ignored; ids beyond the source vocabulary (padded logits) count as mass
that cannot be placed.

The heavy work runs in compiled code that releases the GIL; `align_blocks_parallel` splits the
blocks over threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ..errors import FusionError
from ..sparse import SparseRows, concat
from .modes import Mode, resolve
from .streams import block_prefixes, block_starts, locate
from .tokens import TokenView


def coverage(rows: SparseRows) -> float:
    """Share of rows that received a source distribution (default mode; in reference mode a
    one-hot row also has an entry: use align_blocks' stats there)."""
    return float(np.mean(rows.counts > 0)) if rows.rows else 1.0


def _offsets(ptr, count: int, name: str, blocks: int) -> np.ndarray:
    ptr = np.asarray(ptr, dtype=np.int64)
    if ptr.ndim != 1 or len(ptr) != blocks + 1:
        raise FusionError(f"align_blocks: {name} must have blocks+1 = {blocks + 1} entries, got shape {ptr.shape}")
    if ptr[0] != 0 or ptr[-1] != count or np.any(np.diff(ptr) < 0):
        raise FusionError(f"align_blocks: {name} must rise from 0 to {count} (the number of tokens), "
                          f"got {ptr[0]} .. {ptr[-1]}")
    return ptr


def _tokens(tokens, view: TokenView, side: str) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1:
        raise FusionError(f"align_blocks: {side}_tokens must be 1-d, got shape {tokens.shape}")
    bad = (tokens < 0) | (tokens >= view.size)
    if bad.any():
        raise FusionError(f"align_blocks: {side} token id {int(tokens[bad][0])} at position {int(np.argmax(bad))} "
                          f"is outside the {side} vocabulary {view.name or ''} ({view.size} ids)")
    return tokens


def _placed(view: TokenView, tokens, ptr, text, text_ptr, encoded, side: str, first_block: int):
    """Each token's start in its block's text, its length in bytes there and whether that span
    is its own spelling (streams.locate; FusionError where the tokens do not spell the text)."""
    prefixes = block_prefixes(view.data, view.ptr, tokens, ptr, text, text_ptr)
    lengths = view.lengths[tokens].astype(np.int64)
    exact = np.ones(len(tokens), dtype=np.bool_)
    starts = block_starts(lengths, ptr, np.maximum(prefixes, 0))
    for blk in np.flatnonzero(prefixes < 0):
        a, b = ptr[blk], ptr[blk + 1]
        what = f"block {first_block + blk}, {side} tokens{' (' + view.name + ')' if view.name else ''}"
        starts[a:b], lengths[a:b], exact[a:b] = locate(view, tokens[a:b], encoded[blk], what)
    return starts, lengths, exact


@njit(cache=True, nogil=True)
def _compact(ids, logprobs, counts):
    """Padded [rows, k] entries back to back (what SparseRows holds)."""
    out_ids = np.empty(counts.sum(), np.int32)
    out_logprobs = np.empty(counts.sum(), np.float32)
    n = 0
    for r in range(len(counts)):
        for e in range(counts[r]):
            out_ids[n] = ids[r, e]
            out_logprobs[n] = logprobs[r, e]
            n += 1
    return out_ids, out_logprobs


def _sparse(ids, logprobs, counts, tails) -> SparseRows:
    flat_ids, flat_logprobs = _compact(ids, logprobs, counts)
    return SparseRows(counts=counts, ids=flat_ids, logprobs=flat_logprobs, tail=tails)


def align_blocks(texts, target_tokens, target_ptr, source_tokens, source_ptr, source_topk_ids, source_topk_logprobs,
                 source_tail, target_view: TokenView, source_view: TokenView, mapping=None, mode: str | Mode = "default",
                 stats: dict | None = None, source_continuations=None) -> SparseRows:
    """The source's distributions on the target's rows (all blocks back to back), ids in the
    target vocabulary. `mapping` is the mode's vocab_map(source_view, target_view) (computed, and cached,
    when None). Pass a dict as `stats` to get the rows' coverage (share with a distribution) and
    how they were filled."""
    return _align(texts, target_tokens, target_ptr, source_tokens, source_ptr, source_topk_ids, source_topk_logprobs,
                  source_tail, target_view, source_view, mapping, mode, stats, first_block=0,
                  continuations=source_continuations)


def _align(texts, target_tokens, target_ptr, source_tokens, source_ptr, source_topk_ids, source_topk_logprobs,
           source_tail, target_view, source_view, mapping, mode, stats, first_block, continuations=None):
    """align_blocks on blocks numbered from `first_block` on (in error messages)."""
    mode = resolve(mode, "align_blocks")
    texts = list(texts)
    blocks = len(texts)
    t_tokens = _tokens(target_tokens, target_view, "target")
    s_tokens = _tokens(source_tokens, source_view, "source")
    t_ptr = _offsets(target_ptr, len(t_tokens), "target_ptr", blocks)
    s_ptr = _offsets(source_ptr, len(s_tokens), "source_ptr", blocks)
    topk_ids = np.asarray(source_topk_ids)
    topk_logprobs = np.asarray(source_topk_logprobs, dtype=np.float32)
    if topk_ids.ndim != 2 or topk_ids.shape[0] != len(s_tokens) or topk_logprobs.shape != topk_ids.shape:
        raise FusionError(f"align_blocks: source_topk_ids and source_topk_logprobs must both be [source rows = "
                          f"{len(s_tokens)}, k], got {topk_ids.shape} and {topk_logprobs.shape}")
    topk_ids = topk_ids.astype(np.int64, copy=False)
    tail = np.zeros(len(s_tokens), np.float32) if source_tail is None else np.asarray(source_tail, np.float32)
    if tail.shape != (len(s_tokens),):
        raise FusionError(f"align_blocks: source_tail must be [source rows = {len(s_tokens)}], got {tail.shape}")
    if continuations is not None:
        depth, cont = continuations
        depth = np.asarray(depth, dtype=np.int64)
        if depth.shape != (len(s_tokens),) or int(depth.sum()) != cont.rows:
            raise FusionError(f"align_blocks: continuation depths must be [source rows = {len(s_tokens)}] summing to "
                              f"the {cont.rows} continuation rows, got shape {depth.shape} summing to {int(depth.sum())}")
        continuations = (depth, cont)
    if mapping is None:
        mapping = mode.vocab_map(source_view, target_view)
    mapping = np.asarray(mapping, dtype=np.int32)
    if mapping.shape != (source_view.size,) or (len(mapping) and mapping.max() >= target_view.size):
        raise FusionError(f"align_blocks: mapping must be [source vocabulary = {source_view.size}] of target ids "
                          f"below {target_view.size}, got shape {mapping.shape} (a table for other tokenizers?)")

    encoded = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    text_ptr = np.zeros(blocks + 1, dtype=np.int64)
    np.cumsum([len(t) for t in encoded], out=text_ptr[1:])
    t_start, t_len, t_exact = _placed(target_view, t_tokens, t_ptr, text, text_ptr, encoded, "target", first_block)
    s_start, s_len, s_exact = _placed(source_view, s_tokens, s_ptr, text, text_ptr, encoded, "source", first_block)

    filled = mode.fill(source_view, target_view, mapping, t_tokens, t_ptr, t_start, t_len, t_exact, s_tokens, s_ptr,
                       s_start, s_len, s_exact, topk_ids, topk_logprobs, tail, continuations)
    rows = _sparse(filled.ids, filled.logprobs, filled.counts, filled.tails)
    if stats is not None:
        covered = filled.covered
        stats.update(rows=rows.rows, covered=covered, coverage=covered / rows.rows if rows.rows else 1.0,
                     **{name: int(np.sum(filled.how == code)) for name, code in filled.ways.items()})
    return rows


def _warm(source: TokenView, target: TokenView, mapping, mode: Mode):
    """Build every table align_blocks needs once, before threads share the views."""
    if mapping is None:
        mapping = mode.vocab_map(source, target)
    mode.warm(source, target)
    return mapping


def align_blocks_parallel(texts, target_tokens, target_ptr, source_tokens, source_ptr, source_topk_ids,
                          source_topk_logprobs, source_tail, target_view: TokenView, source_view: TokenView,
                          mapping=None, mode: str | Mode = "default", stats: dict | None = None,
                          workers: int | None = None, source_continuations=None) -> SparseRows:
    """align_blocks over `workers` threads (default: all cores), blocks split into chunks of about
    equal target tokens; the same result as align_blocks."""
    workers = workers or os.cpu_count() or 1
    texts = list(texts)
    t_ptr = _offsets(target_ptr, len(target_tokens), "target_ptr", len(texts))
    s_ptr = _offsets(source_ptr, len(source_tokens), "source_ptr", len(texts))
    mode = resolve(mode, "align_blocks")
    mapping = _warm(source_view, target_view, mapping, mode)
    chunks = min(len(texts), workers * 2)
    if workers == 1 or chunks <= 1:
        return align_blocks(texts, target_tokens, t_ptr, source_tokens, s_ptr, source_topk_ids, source_topk_logprobs,
                            source_tail, target_view, source_view, mapping, mode, stats, source_continuations)
    cuts = np.unique(np.searchsorted(t_ptr, np.linspace(0, t_ptr[-1], chunks + 1), side="left").clip(0, len(texts)))
    cuts[0], cuts[-1] = 0, len(texts)
    tail = None if source_tail is None else np.asarray(source_tail)
    if source_continuations is not None:
        depth = np.asarray(source_continuations[0], dtype=np.int64)
        cont_ptr = np.concatenate([[0], np.cumsum(depth)])

    def run(part):
        b0, b1 = part
        t0, t1, s0, s1 = t_ptr[b0], t_ptr[b1], s_ptr[b0], s_ptr[b1]
        part_stats = {}
        cont = None
        if source_continuations is not None:
            cont = (depth[s0:s1], source_continuations[1].slice(int(cont_ptr[s0]), int(cont_ptr[s1])))
        rows = _align(texts[b0:b1], np.asarray(target_tokens)[t0:t1], t_ptr[b0 : b1 + 1] - t0,
                      np.asarray(source_tokens)[s0:s1], s_ptr[b0 : b1 + 1] - s0, np.asarray(source_topk_ids)[s0:s1],
                      np.asarray(source_topk_logprobs)[s0:s1], None if tail is None else tail[s0:s1], target_view,
                      source_view, mapping, mode, part_stats, first_block=b0, continuations=cont)
        return rows, part_stats

    parts = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, parts))
    rows = concat([r for r, _ in results]) if results else align_blocks(
        texts, target_tokens, t_ptr, source_tokens, s_ptr, source_topk_ids, source_topk_logprobs, source_tail,
        target_view, source_view, mapping, mode, stats, source_continuations)
    if stats is not None and results:
        for key in results[0][1]:
            if key != "coverage":
                stats[key] = sum(s[key] for _, s in results)
        stats["coverage"] = stats["covered"] / stats["rows"] if stats["rows"] else 1.0
    return rows
