"""The paper's dynamic time warping over two token-string sequences, computed in a band.

FuseLLM's `dtw` fills the whole |source| x |target| matrix

    D[i, j] = cost(i, j) + min(D[i-1, j-1], D[i-1, j], D[i, j-1])      (outside the matrix: inf)

with cost = edit distance of the two token strings after deleting each tokenizer's space marker,
then walks back from the last cell, taking at every step the FIRST minimum of (diagonal, up, left).
Source tokens are the rows, target tokens the columns. What the alignment needs from the walk is,
per target column, how many path cells it holds and (when it is one) which source row.

We run the same recursion but remember, per cell, which neighbour gave the minimum: the walk back
compares exactly the three values the forward pass compared, so it takes the same steps.

Band. Only cells within `width` tokens of the text alignment are computed (row i: from the target
token that holds source token i's first byte, minus width, to the one that holds its last byte,
plus width); outside, a cell counts as inf. A band can change the result, so every banded walk is
certified against the full matrix (`certify`: a cheap lower-bound pass over all cells proves that
the full matrix's walk takes the same step everywhere). Where the proof fails the band is widened
four-fold and recomputed, at last to the whole matrix. On the fixture and on real text the first
band is certified; tests compare against the full matrix on random and adversarial inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INF = np.int64(1) << np.int64(60)


@njit(cache=True)
def edit_distance(x, x0, x1, y, y0, y1, row):
    """Levenshtein distance of x[x0:x1] and y[y0:y1] (unit costs); `row` is scratch of len >= y1-y0+1."""
    while x0 < x1 and y0 < y1 and x[x0] == y[y0]:
        x0 += 1
        y0 += 1
    while x0 < x1 and y0 < y1 and x[x1 - 1] == y[y1 - 1]:
        x1 -= 1
        y1 -= 1
    n = x1 - x0
    m = y1 - y0
    if n == 0:
        return m
    if m == 0:
        return n
    for j in range(m + 1):
        row[j] = j
    for i in range(1, n + 1):
        diag = row[0]
        row[0] = i
        xi = x[x0 + i - 1]
        for j in range(1, m + 1):
            best = diag + (1 if xi != y[y0 + j - 1] else 0)
            up = row[j] + 1
            if up < best:
                best = up
            left = row[j - 1] + 1
            if left < best:
                best = left
            diag = row[j]
            row[j] = best
    return row[m]


@njit(cache=True)
def dtw_band(a, b, af, ap, bf, bp, lo, hi):
    """DTW of source ids `a` (rows) against target ids `b` (columns) over cells lo[i]..hi[i] of
    each row i (af/ap, bf/bp: code points and pointers of each vocabulary's marker-free strings).

    Returns the walk back from the last cell as arrays, last cell first: rows, columns, the move
    that left each cell (0 diagonal, 1 up, 2 left) and each cell's banded value; plus each band
    cell's cost (for `certify`) and where each row's cells start in that array. The walk is empty
    where the band does not connect the corners."""
    n = len(a)
    m = len(b)
    start = np.zeros(n + 1, np.int64)
    for i in range(n):
        start[i + 1] = start[i] + hi[i] - lo[i] + 1
    moves = np.empty(start[n], np.int8)
    value = np.empty(start[n], np.int64)
    cost = np.empty(start[n], np.int64)
    longest = 0
    for j in range(m):
        longest = max(longest, bp[b[j] + 1] - bp[b[j]])
    scratch = np.empty(longest + 1, np.int64)

    for i in range(n):
        x0 = ap[a[i]]
        x1 = ap[a[i] + 1]
        for j in range(lo[i], hi[i] + 1):
            c = edit_distance(af, x0, x1, bf, bp[b[j]], bp[b[j] + 1], scratch)
            k = start[i] + j - lo[i]
            cost[k] = c
            if i == 0 and j == 0:
                value[k] = c
                moves[k] = 0
                continue
            up_row = start[i - 1] - lo[i - 1] if i > 0 else 0  # value of (i-1, j) is at up_row + j
            d = value[up_row + j - 1] if (i > 0 and j > 0 and lo[i - 1] <= j - 1 <= hi[i - 1]) else INF
            u = value[up_row + j] if (i > 0 and lo[i - 1] <= j <= hi[i - 1]) else INF
            left = value[k - 1] if j > lo[i] else INF
            if d <= u and d <= left:
                best = d
                moves[k] = 0
            elif u <= left:
                best = u
                moves[k] = 1
            else:
                best = left
                moves[k] = 2
            value[k] = best + c if best < INF else INF

    path_i = np.empty(n + m, np.int64)
    path_j = np.empty(n + m, np.int64)
    path_move = np.empty(n + m, np.int8)
    path_value = np.empty(n + m, np.int64)
    if value[start[n] - 1] >= INF:
        return path_i[:0], path_j[:0], path_move[:0], path_value[:0], cost, start
    i = n - 1
    j = m - 1
    q = 0
    while True:
        k = start[i] + j - lo[i]
        path_i[q] = i
        path_j[q] = j
        path_move[q] = moves[k]
        path_value[q] = value[k]
        q += 1
        if i == 0 and j == 0:
            break
        if moves[k] == 0:
            i -= 1
            j -= 1
        elif moves[k] == 1:
            i -= 1
        else:
            j -= 1
    return path_i[:q], path_j[:q], path_move[:q], path_value[:q], cost, start


@njit(cache=True)
def token_keys(ids, flat, ptr):
    """Per position: the marker-free string's length and a 64-bit FNV-1a hash of it."""
    size = np.empty(len(ids), np.int64)
    key = np.empty(len(ids), np.uint64)
    for q in range(len(ids)):
        h = np.uint64(14695981039346656037)
        for c in range(ptr[ids[q]], ptr[ids[q] + 1]):
            h = (h ^ np.uint64(flat[c])) * np.uint64(1099511628211)
        size[q] = ptr[ids[q] + 1] - ptr[ids[q]]
        key[q] = h
    return size, key


@njit(cache=True)
def certify(a_size, a_key, b_size, b_key, lo, hi, cost, start, path_i, path_j, path_move, path_value):
    """Whether the full matrix's walk takes exactly the banded walk's steps.

    A second pass over the whole matrix computes L, a lower bound of every cell's true value:
    the same recursion with the exact cost inside the band and, outside, max(length difference,
    1 if the strings differ) <= edit distance. The banded value of a cell is an upper bound of
    its true value (it minimises over fewer paths). At every step of the banded walk, the cell it
    chose has true value <= its banded value V; if each competitor has L > V (or L >= V where the
    walk's tie-break order puts it after the chosen one), the full matrix's walk makes the same
    choice there. Holding at every step, the walks are the same: a proof, not a heuristic.

    Cells whose L exceeds the banded optimum U (>= every V) can never be a competitor that wins,
    so, as in PrunedDTW, each row is only computed from the first column the row above left at
    or below U, and as far right as values stay at or below U."""
    n = len(a_size)
    m = len(b_size)
    limit = path_value[0]
    prev = np.full(m + 1, INF, np.int64)  # column j at index j + 1; index 0 is the matrix edge
    cur = np.full(m + 1, INF, np.int64)
    prev_first = 0  # the row above: first column at or below the limit ...
    prev_stop = 0  # ... and one past the last column it wrote
    q = len(path_i) - 1  # the walk runs last cell first: the first row's cells are at its end
    for i in range(n):
        size = a_size[i]
        key = a_key[i]
        j = prev_first
        row_first = -1
        if i == 0:
            cur[1] = cost[0]
            row_first = 0
            j = 1
        while j < m:
            best = min(prev[j + 1], prev[j], cur[j])
            if best >= INF and j >= prev_stop:
                break  # nothing at or below the limit reaches this column or any further right
            if best < INF:
                if lo[i] <= j <= hi[i]:
                    c = cost[start[i] + j - lo[i]]
                else:
                    c = abs(size - b_size[j])
                    if c == 0 and key != b_key[j]:
                        c = 1
                if best + c <= limit:
                    cur[j + 1] = best + c
                    if row_first < 0:
                        row_first = j
            j += 1
        row_stop = j
        while q >= 0 and path_i[q] == i:
            j = path_j[q]
            if q + 1 < len(path_i):
                chosen = path_move[q]
                v = path_value[q + 1]
                for other in range(3):
                    if other != chosen:
                        bound = prev[j] if other == 0 else prev[j + 1] if other == 1 else cur[j]
                        if bound < v or (bound == v and other < chosen):
                            return False
            q -= 1
        for r in range(prev_first, prev_stop + 1):
            prev[r] = INF
        prev, cur = cur, prev
        prev_first, prev_stop = max(row_first, 0), row_stop
    return True


@njit(cache=True)
def band(first, last, m, width):
    """Band rows for DTW: row i spans target columns first[i]-width .. last[i]+width, made monotone
    and connected, and always holding the first and the last cell."""
    n = len(first)
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    for i in range(n):
        lo[i] = min(max(first[i] - width, 0), m - 1)
        hi[i] = min(max(last[i] + width, lo[i]), m - 1)
        if i > 0:
            lo[i] = max(lo[i], lo[i - 1])
            hi[i] = max(hi[i], hi[i - 1], lo[i])
    lo[0] = 0
    hi[n - 1] = m - 1
    for i in range(1, n):
        lo[i] = min(lo[i], hi[i - 1] + 1)
    return lo, hi


@njit(cache=True)
def text_columns(a_start, a_len, b_start):
    """For each source token (byte span a_start..a_start+a_len in the text, ascending), the target
    tokens (by their byte starts b_start, ascending) holding its first and its last byte."""
    n = len(a_start)
    first = np.zeros(n, np.int64)
    last = np.zeros(n, np.int64)
    j = 0
    for i in range(n):
        while j + 1 < len(b_start) and b_start[j + 1] <= a_start[i]:
            j += 1
        first[i] = j
        end = a_start[i] + max(a_len[i] - 1, 0)
        q = j
        while q + 1 < len(b_start) and b_start[q + 1] <= end:
            q += 1
        last[i] = q
    return first, last


@njit(cache=True)
def diagonal_columns(n, m):
    """Where there is no text alignment: the straight diagonal."""
    col = np.empty(n, np.int64)
    for i in range(n):
        col[i] = int(round(i * (m - 1) / max(n - 1, 1)))
    return col, col.copy()


@njit(cache=True)
def dtw_path_columns(a, b, af, ap, bf, bp, first, last, width=32):
    """Per target column: (count of path cells, source row of its path cell where count == 1),
    exactly as the full matrix gives them. Computes the band around first/last, certifies the
    walk (`certify`), and widens the band four-fold until it is certified (at last: the whole
    matrix, which needs no certificate). Also returns the band width finally used."""
    n = len(a)
    m = len(b)
    count = np.zeros(m, np.int32)
    row_of = np.full(m, -1, np.int32)
    if n == 0 or m == 0:
        return count, row_of, 0
    a_size, a_key = token_keys(a, af, ap)
    b_size, b_key = token_keys(b, bf, bp)
    while True:
        full = width >= max(n, m)
        if full:
            lo = np.zeros(n, np.int64)
            hi = np.full(n, m - 1, np.int64)
        else:
            lo, hi = band(first, last, m, width)
        path_i, path_j, path_move, path_value, cost, start = dtw_band(a, b, af, ap, bf, bp, lo, hi)
        if full or (len(path_i) and certify(a_size, a_key, b_size, b_key, lo, hi, cost, start, path_i, path_j,
                                            path_move, path_value)):
            break
        width *= 4
    for q in range(len(path_i)):
        count[path_j[q]] += 1
        row_of[path_j[q]] = path_i[q]
    return count, row_of, width
