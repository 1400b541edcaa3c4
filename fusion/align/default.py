"""Default alignment: share a source distribution wherever the two contexts end at the same text.

Our row convention (fusion/sparse.py): target row j is the target's distribution over its token
t_j given the text before t_j. Call c the byte offset in the text where t_j starts, i.e. where
the context of row j ends. A source row i whose token starts at the same offset c was computed
from the same text: it predicts the same continuation, only spelled in source tokens. So:

1. Same boundary (c equals a source token's start): take that source row. Every listed source
   token x stands for some bytes; its probability goes to the target token those bytes begin
   with (vocab.py default map: exact bytes, else the longest target token that is a prefix).
   This covers 1:1, n:1 and 1:n segmentations alike.
2. Boundary inside a source token (the source token s_i starting at c - k, 0 < k < its length,
   holds c): the source's last distribution before c is row i, and the text has since committed
   the first k bytes of s_i. Condition row i on them: a listed x whose bytes begin with those k
   bytes says the text goes on with the rest of x, whose first target token gets x's probability
   (continuation table); an x that disagrees with them is impossible now and is dropped; an x
   that ends within them (or at them) says nothing about what follows c, so its mass is unknown.
   The rest is renormalised by the mass that stays possible (listed agreeing entries, the unknown
   ones and the source's whole tail, which we cannot split and count as possible: this never
   sharpens the teacher beyond what its top-k supports).
   Where the logits stage stored continuation rows (fusion/continuations.py), row i's row for
   depth k says the same from the whole distribution, not only the top-k: every listed x begins
   with the k committed bytes, probabilities are already divided by the mass that stays possible,
   and its tail is the unknown rest. It is used instead of the conditioned top-k (how: CONTINUED);
   past the deepest row stored (16 bytes into a token: long runs of spaces), the deepest row is
   conditioned on the bytes after it as the top-k would be, and the top-k is the last resort.
3. A target that spells a dummy space in front of the text (SentencePiece) predicts, at its row 0,
   a space followed by the text; a source without that space predicts the text at its row 0:
   each x goes to the target token " " + x begins with (dummy-prefix table). The reverse (source
   with dummy space, target without) is case 2 with k = 1.
4. Tokens that stand for no text (BOS, EOS, pad) pair with a source token that also stands for no
   text at the same offset (EOS after the same text on both sides shares the distribution), else
   their row gets none.

5. A tokenizer that normalized the text (streams.locate) has tokens whose span in the text is not
   their own spelling (a collapsed run of spaces). Case 1 holds for them as for any token; case 2
   needs the committed bytes, which such a span does not give: no distribution there.

Every row keeps the mass it could not place as `tail`: the source's own tail plus listed ids
without a target token. Ids that land on the same target token add their probabilities. A row
with no entries means no distribution: training falls back to the one-hot on the row's real
token t_j, which is the NEXT token of the context (the paper's fallback was on the current one).
"""

from __future__ import annotations

import numpy as np
from numba import njit

NONE, SHARED, CONDITIONED, DUMMY, SPECIAL, CONTINUED = 0, 1, 2, 3, 4, 5


@njit(cache=True, nogil=True)
def _add(y, p, n, prob, slot):
    """Add probability p to target id y among the row's n entries so far; returns the new n."""
    for r in range(n):
        if slot[r] == y:
            prob[r] += p
            return n
    slot[n] = y
    prob[n] = p
    return n + 1


@njit(cache=True, nogil=True)
def _write(row, n, prob, slot, possible, unknown, ids, logprobs, counts, tails):
    """Write the n entries, most probable first, divided by the mass that stays possible;
    returns whether the row got any entry."""
    if n == 0 or possible <= 0.0:
        return False
    for r in range(1, n):  # insertion sort, most probable first
        p, y = prob[r], slot[r]
        q = r - 1
        while q >= 0 and prob[q] < p:
            prob[q + 1] = prob[q]
            slot[q + 1] = slot[q]
            q -= 1
        prob[q + 1] = p
        slot[q + 1] = y
    for r in range(n):
        ids[row, r] = slot[r]
        logprobs[row, r] = np.log(prob[r] / possible)
    counts[row] = n
    tails[row] = unknown / possible
    return True


@njit(cache=True, nogil=True)
def _row(row, i, k, topk_ids, topk_logprobs, tail, s_ids, s_data, s_vptr, direct, continuation, dummy,
         ids, logprobs, counts, tails, prob, slot):
    """Fill target row `row` from source row i; k = bytes of s_i already committed (-1: target
    dummy space ahead). Returns whether the row got any entry."""
    committed = s_vptr[s_ids[i]]
    n = 0
    possible = 0.0
    unknown = 0.0
    for e in range(topk_ids.shape[1]):
        x = topk_ids[i, e]
        if x < 0:
            continue  # padding
        p = np.exp(np.float64(topk_logprobs[i, e]))
        if x >= len(direct):
            y = -1  # an id beyond the tokenizer (a padded logit): its mass is unknown
        elif k == 0:
            y = direct[x]
        elif k < 0:
            y = dummy[x]
        else:
            x0 = s_vptr[x]
            size = s_vptr[x + 1] - x0
            if size == 0:
                continue  # stands for no text: contradicts the committed bytes
            agrees = True
            for r in range(min(size, k)):
                if s_data[x0 + r] != s_data[committed + r]:
                    agrees = False
                    break
            if not agrees:
                continue
            y = continuation[x0 + k] if size > k else -1
        possible += p
        if y < 0:
            unknown += p
            continue
        n = _add(y, p, n, prob, slot)
    rest = max(np.float64(tail[i]), 0.0)
    possible += rest
    unknown += rest
    return _write(row, n, prob, slot, possible, unknown, ids, logprobs, counts, tails)


@njit(cache=True, nogil=True)
def _continued(row, c, d, k, i, s_ids, s_data, cont_ptr, cont_ids, cont_logprobs, cont_tail, s_vptr, direct,
               continuation, ids, logprobs, counts, tails, prob, slot):
    """Fill target row `row` from continuation row c of source row i, written for the first d
    bytes of s_i, where k >= d bytes are committed: its entries already begin with the first d;
    beyond them they are conditioned as in case 2. Returns whether the row got any entry."""
    committed = s_vptr[s_ids[i]]
    n = 0
    rest = max(np.float64(cont_tail[c]), 0.0)
    possible = rest
    unknown = rest
    for e in range(cont_ptr[c], cont_ptr[c + 1]):
        x = cont_ids[e]
        p = np.exp(np.float64(cont_logprobs[e]))
        y = -1
        if 0 <= x < len(direct):
            x0 = s_vptr[x]
            size = s_vptr[x + 1] - x0
            agrees = True
            for r in range(d, min(size, k)):
                if s_data[x0 + r] != s_data[committed + r]:
                    agrees = False
                    break
            if not agrees:
                continue
            if size > k:
                y = continuation[x0 + k]
        possible += p
        if y < 0:
            unknown += p
            continue
        n = _add(y, p, n, prob, slot)
    return _write(row, n, prob, slot, possible, unknown, ids, logprobs, counts, tails)


@njit(cache=True, nogil=True)
def default_blocks(t_ids, t_ptr, t_start, t_len, t_exact, s_ids, s_ptr, s_start, s_len, s_exact, topk_ids,
                   topk_logprobs, tail, s_data, s_vptr, direct, continuation, dummy, cont_depth, cont_first, cont_ptr,
                   cont_ids, cont_logprobs, cont_tail):
    """Default mode on many blocks (see the module doc). t_start/s_start: each token's start in
    its block's text (a dummy space at -1), t_len/s_len: its length in bytes there, t_exact /
    s_exact: whether those bytes are the token's own (False where the tokenizer normalized the
    text: streams.locate). A boundary inside an inexact source token, and an inexact target token
    that covers no text, get no distribution: what the source has committed there is not known
    byte for byte.
    cont_depth / cont_first: per source row, its continuation rows and the first one's index
    (cont_depth all 0: none stored); cont_ptr: each continuation row's entries in cont_ids /
    cont_logprobs; cont_tail: its tail.
    Returns padded [rows, k] ids / log-probs, counts, tails and per row how it was filled."""
    rows = len(t_ids)
    width = 0
    for c in range(len(cont_ptr) - 1):
        width = max(width, cont_ptr[c + 1] - cont_ptr[c])
    k = max(topk_ids.shape[1], width, 1)
    ids = np.full((rows, k), -1, np.int32)
    logprobs = np.zeros((rows, k), np.float32)
    counts = np.zeros(rows, np.int32)
    tails = np.ones(rows, np.float32)
    how = np.zeros(rows, np.int8)
    prob = np.empty(k, np.float64)
    slot = np.empty(k, np.int64)
    for blk in range(len(t_ptr) - 1):
        s0, s1 = s_ptr[blk], s_ptr[blk + 1]
        q = s0  # source rows before q start at or before the current offset c
        last_text = -1  # the last of them that stands for text
        z = s0  # the next source row that stands for no text and may still be paired
        for j in range(t_ptr[blk], t_ptr[blk + 1]):
            c = t_start[j]
            while q < s1 and s_start[q] <= c:
                if s_len[q] > 0:
                    last_text = q
                q += 1
            if t_len[j] == 0:
                if not t_exact[j]:
                    continue  # spelled by the normalization alone
                while z < s1 and s_start[z] < c:
                    z += 1
                i = z
                while i < s1 and s_start[i] == c and (s_len[i] > 0 or not s_exact[i]):
                    i += 1
                if i < s1 and s_start[i] == c:
                    z = i + 1
                    if _row(j, i, 0, topk_ids, topk_logprobs, tail, s_ids, s_data, s_vptr, direct, continuation,
                            dummy, ids, logprobs, counts, tails, prob, slot):
                        how[j] = SPECIAL
                continue
            if last_text < 0:
                first = q
                while first < s1 and s_len[first] == 0:
                    first += 1
                if first < s1 and s_start[first] - c == 1:
                    if _row(j, first, -1, topk_ids, topk_logprobs, tail, s_ids, s_data, s_vptr, direct,
                            continuation, dummy, ids, logprobs, counts, tails, prob, slot):
                        how[j] = DUMMY
                continue
            shift = c - s_start[last_text]
            if shift > 0 and not s_exact[last_text]:
                continue
            if shift > 0 and cont_depth[last_text] > 0:
                d = min(shift, cont_depth[last_text])  # the deepest row written at or before the boundary
                if _continued(j, cont_first[last_text] + d - 1, d, shift, last_text, s_ids, s_data, cont_ptr, cont_ids,
                              cont_logprobs, cont_tail, s_vptr, direct, continuation, ids, logprobs, counts, tails,
                              prob, slot):
                    how[j] = CONTINUED
                    continue
            if _row(j, last_text, shift, topk_ids, topk_logprobs, tail, s_ids, s_data, s_vptr, direct, continuation,
                    dummy, ids, logprobs, counts, tails, prob, slot):
                how[j] = SHARED if shift == 0 else CONDITIONED
    return ids, logprobs, counts, tails, how
