"""The paper's token alignment (FuseLLM `transform_step_logits`), reproduced exactly.

Rows here follow the paper's convention: row j belongs to target token j and holds the source's
prediction made AFTER the source token aligned to it. For every target token j:

- the DTW path (dtw.py) must hold exactly one cell in column j, at source row i;
- that source token must match target token j: the same string once the source's space marker is
  spelled as the target's ("hard"), or the same string or the same one through the vocabulary
  map ("soft"). At target position 0 a byte-level source token that lacks the marker the target
  token starts with gets it prepended first (the original's special case for byte-level sources);
- then the row is the source's top-k at row i, ids translated through the map (hard: exact string,
  soft: the vocabulary map), ids with no translation dropped, repeated ids keeping their first
  entry, order and values as given;
- otherwise the row is a one-hot: value 1.0 on the CURRENT target token's own id (the defect our
  default mode fixes).

`kind` per row: 0 = source distribution, 1 = one-hot, 2 = matched but every id dropped (empty).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtw import dtw_path_columns, text_columns

DISTRIBUTION, ONE_HOT, EMPTY = 0, 1, 2


@njit(cache=True)
def reference_rows(a, b, count, row_of, match_hard, match_soft, translate, canon_b, first_match, topk_ids, topk_vals,
                   row_base=0, row_limit=-1):
    """Rows in the paper's convention as CSR (ptr, idx, val, kind); see the module doc.

    match_hard/match_soft: source id -> target id its string equals (-1: none), the second
    through the soft map (pass match_hard twice for hard mode); translate: source id -> target id
    for top-k entries; canon_b: target id -> the id its string has in the vocabulary;
    first_match: -1 = no special case at position 0, else 0/1 = its outcome. The prediction after
    source token i is topk row row_base + i; at or past row_limit (if >= 0) there is none."""
    m = len(b)
    k = topk_ids.shape[1]
    ptr = np.zeros(m + 1, np.int64)
    idx = np.empty(m * max(k, 1), np.int64)
    val = np.empty(m * max(k, 1), np.float64)
    kind = np.empty(m, np.int8)
    n = 0
    for j in range(m):
        target = canon_b[b[j]]
        matched = False
        i = -1
        if count[j] == 1:
            i = row_of[j]
            s = a[i]
            matched = ((match_hard[s] >= 0 and match_hard[s] == target)
                       or (match_soft[s] >= 0 and match_soft[s] == target))
            if j == 0 and first_match >= 0:
                matched = first_match == 1
        if matched:
            row_start = n
            r = row_base + i
            for e in range(k if row_limit < 0 or r < row_limit else 0):
                x = topk_ids[r, e]
                if x < 0 or x >= len(translate) or translate[x] < 0:
                    continue
                y = translate[x]
                seen = False
                for q in range(row_start, n):
                    if idx[q] == y:
                        seen = True
                        break
                if not seen:
                    idx[n] = y
                    val[n] = topk_vals[r, e]
                    n += 1
            kind[j] = DISTRIBUTION if n > row_start else EMPTY
        else:
            idx[n] = target
            val[n] = 1.0
            n += 1
            kind[j] = ONE_HOT
        ptr[j + 1] = n
    return ptr, idx[:n], val[:n], kind


def first_token_match(source_string: str, target_string: str, source_marker: str, target_marker: str,
                      source_byte_level: bool, soft_lookup) -> int:
    """The original's special case at target position 0 (-1 where it does not apply, else 0/1).

    soft_lookup(string) -> the target string the soft map gives for a source string spelled with
    the target's marker (None in hard mode or where the string is no source token)."""
    if not source_byte_level or not target_marker:
        return -1
    spelled = source_string.replace(source_marker, target_marker) if source_marker else source_string
    if not target_string.startswith(target_marker) or spelled.startswith(target_marker):
        return -1
    spelled = target_marker + spelled
    if spelled == target_string:
        return 1
    return int(soft_lookup is not None and soft_lookup(spelled) == target_string)


def align_reference(a, b, a_codepoints, b_codepoints, first, last, match_hard, match_soft, translate, canon_b,
                    first_match_of, topk_ids, topk_vals, width=32):
    """One sequence in the paper's convention: DTW (banded, exact) then reference_rows.

    first/last: per source token, the target columns its first/last byte lie in (the band's
    centre); first_match_of(count, row_of) -> the position-0 special case (see first_token_match)."""
    af, ap = a_codepoints
    bf, bp = b_codepoints
    count, row_of, _ = dtw_path_columns(a, b, af, ap, bf, bp, first, last, width=width)
    first_match = first_match_of(count, row_of) if len(b) and count[0] == 1 else -1
    return reference_rows(np.asarray(a, np.int64), np.asarray(b, np.int64), count, row_of, match_hard, match_soft,
                          translate, canon_b, first_match, topk_ids, topk_vals)


@njit(cache=True, nogil=True)
def reference_blocks(t_ids, t_ptr, t_start, t_len, s_ids, s_ptr, s_start, s_len, topk_ids, topk_logprobs,
                     af, ap, bf, bp, match_hard, match_soft, translate, canon_b, first_match, width):
    """Reference mode on many blocks, in OUR row convention (fusion/sparse.py).

    Our target row j+1 is the paper's row j: the source's row after the aligned source token i,
    which is our source row i+1 (none after the block's last source token); our row 0 gets no
    distribution and the paper's last row is dropped. Entries are renormalised over the listed
    ids (the paper softmaxes the top-k and drops the rest: tail 0); the paper's one-hot on the
    current token t_j becomes one entry on t_j with log-probability 0 at our row j+1.
    Returns padded [rows, k] ids / log-probs, counts, and per row the paper's kind (-1: row 0)."""
    rows = len(t_ids)
    k = max(topk_ids.shape[1], 1)
    ids = np.full((rows, k), -1, np.int32)
    logprobs = np.zeros((rows, k), np.float32)
    counts = np.zeros(rows, np.int32)
    kinds = np.full(rows, -1, np.int8)
    for blk in range(len(t_ptr) - 1):
        t0, t1, s0, s1 = t_ptr[blk], t_ptr[blk + 1], s_ptr[blk], s_ptr[blk + 1]
        if t1 == t0:
            continue
        a = s_ids[s0:s1]
        b = t_ids[t0:t1]
        first, last = text_columns(s_start[s0:s1], s_len[s0:s1], t_start[t0:t1])
        count, row_of, _ = dtw_path_columns(a, b, af, ap, bf, bp, first, last, width)
        fm = first_match[blk] if (len(b) and count[0] == 1) else -1
        ptr, idx, val, kind = reference_rows(a, b, count, row_of, match_hard, match_soft, translate, canon_b, fm,
                                             topk_ids, topk_logprobs, s0 + 1, s1)
        for j in range(t1 - t0 - 1):
            row = t0 + j + 1
            kinds[row] = kind[j]
            lo, hi = ptr[j], ptr[j + 1]
            if kind[j] == ONE_HOT:
                ids[row, 0] = idx[lo]
                logprobs[row, 0] = 0.0
                counts[row] = 1
            elif hi > lo:
                top = val[lo]
                for q in range(lo, hi):
                    top = max(top, val[q])
                total = 0.0
                for q in range(lo, hi):
                    total += np.exp(val[q] - top)
                norm = top + np.log(total)
                for q in range(lo, hi):
                    ids[row, q - lo] = idx[q]
                    logprobs[row, q - lo] = val[q] - norm
                counts[row] = hi - lo
    return ids, logprobs, counts, kinds
