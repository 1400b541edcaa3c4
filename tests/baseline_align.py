"""BASELINE ONLY: plain-Python versions of the alignment algorithms, one cell / one entry at a time.

They exist to check the compiled code (tests) and to measure it against (bench/bench_align.py),
not to be used. They work on the same inputs as fusion.align's kernels and must give the same
results: the paper's DTW over the whole matrix and its row rule (paper's row convention), and
the default mode's shared-boundary / conditioning rule (our row convention).
"""

from __future__ import annotations

import math

import editdistance

INF = float("inf")


def dtw_columns(a: list[str], b: list[str]) -> list[list[int]]:
    """Full-matrix DTW of source strings a (rows) and target strings b (columns), cost = edit
    distance; walking back from the last cell taking the first minimum of (diagonal, up, left).
    Returns, per target column, the source rows of the path cells in it (ascending)."""
    n, m = len(a), len(b)
    d = [[INF] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = editdistance.eval(a[i - 1], b[j - 1]) + min(d[i - 1][j - 1], d[i - 1][j], d[i][j - 1])
    columns: list[list[int]] = [[] for _ in range(m)]
    i, j = n, m
    while True:
        columns[j - 1].insert(0, i - 1)
        if i == 1 and j == 1:
            return columns
        options = [d[i - 1][j - 1] if i > 1 and j > 1 else INF, d[i - 1][j] if i > 1 else INF,
                   d[i][j - 1] if j > 1 else INF]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)


def reference_rows(a_strings, b_strings, a_ids, b_ids, topk_ids, topk_vals, a_marker, b_marker, b_vocab,
                   soft=None, byte_level_source=True):
    """The paper's rows (its convention: row j after target token j) as a list of [(id, value)].
    a_strings/b_strings: token strings per id; soft: source string spelled with b_marker -> target
    string (None: hard mode)."""
    a_tokens = [a_strings[x] for x in a_ids]
    b_tokens = [b_strings[x] for x in b_ids]
    columns = dtw_columns([t.replace(a_marker, "") for t in a_tokens], [t.replace(b_marker, "") for t in b_tokens])
    rows = []
    for j, column in enumerate(columns):
        target = b_tokens[j]
        row = []
        matched = False
        if len(column) == 1:
            i = column[0]
            source = a_tokens[i].replace(a_marker, b_marker)
            if byte_level_source and j == 0 and target.startswith(b_marker) and not source.startswith(b_marker):
                source = b_marker + source
            matched = source == target or (soft is not None and soft.get(source) == target)
        if matched:
            for x, value in zip(topk_ids[i], topk_vals[i]):
                spelled = a_strings[x].replace(a_marker, b_marker)
                if soft is not None:
                    spelled = soft.get(spelled)
                y = b_vocab.get(spelled)
                if y is not None and y not in [e[0] for e in row]:
                    row.append((y, float(value)))
        else:
            row.append((b_vocab[target], 1.0))
        rows.append(row)
    return rows


def longest_prefix(table: dict[bytes, int], data: bytes) -> int:
    for size in range(len(data), 0, -1):
        if data[:size] in table:
            return table[data[:size]]
    return -1


def default_rows(text: bytes, t_bytes: list[bytes], s_bytes: list[bytes], topk_ids, topk_logprobs, tail,
                 vocab_bytes: list[bytes], direct, first_token_of, full=None, m=0, max_depth=16):
    """Our default mode for one block whose tokens stand for no special tokens. t_bytes/s_bytes:
    the bytes of each target/source token; vocab_bytes: bytes of each source id; direct: source id
    -> target id; first_token_of(bytes) -> the target token those bytes begin with (-1: none).
    full: each source row's whole distribution ([rows, vocab] probabilities), for the continuation
    rows (m entries; boundaries up to max_depth bytes into a source token).
    Returns per target row {target id: probability} and its tail (rows without entries: {}, 1.0)."""
    def starts(tokens):
        prefix = len(b"".join(tokens)) - len(text)
        out, pos = [], -prefix
        for t in tokens:
            out.append(pos)
            pos += len(t)
        return out

    t_start, s_start = starts(t_bytes), starts(s_bytes)
    rows = []
    for j, c in enumerate(t_start):
        before = [i for i, s in enumerate(s_start) if s <= c]
        entries, possible, unknown = {}, 0.0, 0.0
        if before:
            i = before[-1]
            k = c - s_start[i]
            committed = s_bytes[i][:k]
        elif s_start and s_start[0] - c == 1:
            i, k, committed = 0, -1, b""
        else:
            rows.append(({}, 1.0))
            continue
        if full is not None and k > 0 and len(s_bytes[i]) > 1:
            rows.append(continued_row(full[i], committed, vocab_bytes, first_token_of, m, max_depth))
            continue
        for x, lp in zip(topk_ids[i], topk_logprobs[i]):
            p = math.exp(lp)
            data = vocab_bytes[x]
            if k == 0:
                y = direct[x]
            elif k < 0:
                y = first_token_of(b" " + data)
            else:
                if not data or not (data.startswith(committed) or committed.startswith(data)):
                    continue
                y = first_token_of(data[k:]) if len(data) > k else -1
            possible += p
            if y < 0:
                unknown += p
            else:
                entries[y] = entries.get(y, 0.0) + p
        possible += tail[i]
        unknown += tail[i]
        if not entries:
            rows.append(({}, 1.0))
        else:
            rows.append(({y: p / possible for y, p in entries.items()}, unknown / possible))
    return rows


def continued_row(probs, committed: bytes, vocab_bytes: list[bytes], first_token_of, m: int, max_depth: int = 16):
    """A boundary k = len(committed) bytes into a source token, from the source's whole
    distribution: the m most probable tokens that go on past the first d = min(k, max_depth)
    committed bytes, divided by the mass of every token that agrees with those d bytes (the
    continuation row of depth d); then, where d < k, those entries conditioned on the rest of
    the committed bytes (agreeing ones kept, disagreeing ones dropped, those ending within them
    unknown, the row's tail possible and unknown); each kept entry to the target token its
    remaining bytes begin with."""
    k = len(committed)
    d = min(k, max_depth)
    head = committed[:d]
    longer = [(float(probs[x]), x) for x, data in enumerate(vocab_bytes) if len(data) > d and data.startswith(head)]
    ending = sum(float(probs[x]) for x, data in enumerate(vocab_bytes) if data and head.startswith(data))
    total = sum(p for p, _ in longer) + ending
    top = sorted(longer, key=lambda e: (-e[0], e[1]))[:m]
    rest = 1.0 - sum(p for p, _ in top) / total  # the row's tail
    entries, possible, unknown = {}, rest, rest
    for p, x in top:
        data = vocab_bytes[x]
        if not (data.startswith(committed) or committed.startswith(data)):
            continue
        possible += p / total
        y = first_token_of(data[k:]) if len(data) > k else -1
        if y < 0:
            unknown += p / total
        else:
            entries[y] = entries.get(y, 0.0) + p / total
    if not entries:
        return {}, 1.0
    return {y: p / possible for y, p in entries.items()}, unknown / possible
