"""Fusion functions: many aligned next-token distributions in, one teacher distribution out.

Candidates are `SparseRows` over the same target rows (see fusion.sparse): candidates[0] is the
target model's own distribution, the others are sources aligned to the target's tokens and
vocabulary. Each candidate row is a distribution P_c = (listed p_c(id), tail_c) with
sum p_c + tail_c = 1 (rows are renormalised to that on the way in, which absorbs float16
storage error). A row with no entries means "this candidate has no distribution here".

Metric (a cost, lower is better), per sequence (block) or per row:
- "nll_per_byte" (default): the model's total NLL of the block divided by its UTF-8 bytes.
  Every model sees the same text, so this compares like with like across tokenizers.
- "ce_per_token" (the paper's): mean NLL per the model's own token. It favours tokenizers
  that split finely (NOTES.md defect 4).
- token level: cost_c(r) = -log p_c(label_r) under the candidate's aligned sparse row (the
  original's token level is broken, defect 7). When the label is not listed, `outside`
  decides: "tail" (default) spreads the tail mass uniformly over the unlisted vocabulary,
  p = tail / (V - listed), the maximum-entropy reading of what is stored; "unknown" gives
  cost +inf so that candidate cannot win the row on it. A candidate with no row there
  cannot win (cost +inf, and it is never picked); when every available candidate has cost
  +inf the first available one wins, so ties and dead heats go to the target.

Functions, over the rows where a candidate has a distribution:
- MinCE ("mince"): the candidate with the lowest cost, ties to the lowest index (the target).
  At sequence level a winner without a row somewhere yields that row to the next best
  candidate (the original copies the target's row there instead; same thing with one source).
- AvgCE ("avgce"): the mixture sum_c w_c P_c. Default weights ("softmin"): w_c ∝ exp(-cost_c
  / tau), tau = 0.1 at sequence level (a difference of 0.1 nat per byte gives odds e:1) and
  1.0 at token level (w_c ∝ p_c(label): the posterior of which candidate produced the token).
  The paper's weights ("paper") are softmax(exp(-cost)), nearly uniform (defect 5: CE 1.8 vs
  2.2 gives 0.514 / 0.486).
- `paper_rewards=True` reproduces the original's comparison: rewards exp(-CE) computed in
  bfloat16 exactly as torch does (CE rounded to bf16, exp rounded, 1/x rounded), compared with
  ties to the target, and the paper's softmax weights rounded to bf16 (defect 4: close sources
  tie). The mixing arithmetic itself stays float64 (the original mixes dense bf16 tensors).

Mixture bookkeeping: supports are united and the probabilities of an id listed by several
candidates add (defect 6: collisions add, never "keep the first"); the tail is sum_c w_c
tail_c, so a listed probability is a lower bound (part of an id's mass may sit in another
candidate's tail). The result keeps the `top_k` most probable ids, sorted by descending
probability (ties by id), and moves the rest into the tail: sum p + tail = 1.
"""

from __future__ import annotations

import numpy as np

from fusion.errors import FusionError
from fusion.sparse import SparseRows

SEQUENCE_METRICS = ("nll_per_byte", "ce_per_token")
DEFAULT_TAU = {"sequence": 0.1, "token": 1.0}


def sequence_metric(kind: str, seq_nll, seq_bytes=None, seq_tokens=None) -> np.ndarray:
    """Per-sequence cost (float64, lower is better) from a model's stored per-sequence numbers:
    total NLL in nats, UTF-8 bytes of the block's text, the model's own token count."""
    nll = np.asarray(seq_nll, dtype=np.float64)
    if kind not in SEQUENCE_METRICS:
        raise FusionError(f"sequence metric {kind!r}: expected one of {SEQUENCE_METRICS}")
    denom = seq_bytes if kind == "nll_per_byte" else seq_tokens
    name = "seq_bytes" if kind == "nll_per_byte" else "seq_tokens"
    if denom is None:
        raise FusionError(f"sequence metric {kind!r} needs {name}")
    denom = np.asarray(denom, dtype=np.float64)
    if denom.shape != nll.shape:
        raise FusionError(f"sequence metric: {name} has shape {denom.shape}, seq_nll {nll.shape}")
    if (denom <= 0).any():
        raise FusionError(f"sequence metric: {name} is not positive at sequence {int(np.argmax(denom <= 0))}")
    return nll / denom


def _bf16(x) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), through float32 as torch does."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def paper_reward(cost) -> np.ndarray:
    """The original's reward 1 / exp(CE) with every step rounded to bfloat16 (float32 values)."""
    c = _bf16(np.asarray(cost, dtype=np.float64))
    e = _bf16(np.exp(c.astype(np.float64)).astype(np.float32))
    return _bf16((1.0 / e.astype(np.float64)).astype(np.float32))


def _entries(rows: SparseRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row index of every entry, entry probabilities and row tails, rows renormalised to 1."""
    row = np.repeat(np.arange(rows.rows), rows.counts)
    p = np.exp(rows.logprobs.astype(np.float64))
    tail = np.clip(rows.tail.astype(np.float64), 0.0, None)
    total = np.bincount(row, weights=p, minlength=rows.rows) + tail
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    return row, p * scale[row], tail * scale


def token_nll(rows: SparseRows, labels, vocab_size: int, outside: str = "tail") -> np.ndarray:
    """-log p(label) per row (float64); +inf where the row is empty or the label has no mass.
    outside: "tail" (label not listed: tail spread uniformly over the unlisted ids) or "unknown"
    (label not listed: +inf)."""
    if outside not in ("tail", "unknown"):
        raise FusionError(f"outside={outside!r}: expected 'tail' or 'unknown'")
    labels = np.asarray(labels)
    row, p, tail = _entries(rows)
    hit = rows.ids == labels[row]
    p_label = np.bincount(row[hit], weights=p[hit], minlength=rows.rows)
    found = np.bincount(row[hit], minlength=rows.rows) > 0
    if outside == "tail":
        unlisted = np.maximum(vocab_size - rows.counts.astype(np.int64), 1)
        p_label = np.where(found, p_label, tail / unlisted)
    p_label = np.where(rows.counts > 0, p_label, 0.0)
    with np.errstate(divide="ignore"):
        return -np.log(p_label)


def _first_available(avail: np.ndarray) -> np.ndarray:
    return np.argmax(avail, axis=0)


def _mince_weights(key: np.ndarray, avail: np.ndarray) -> np.ndarray:
    key = np.where(avail, key, np.inf)
    win = np.argmin(key, axis=0)  # first minimum: ties go to the target
    dead = ~avail[win, np.arange(key.shape[1])]  # every available key is +inf
    win = np.where(dead, _first_available(avail), win)
    w = np.zeros(key.shape)
    w[win, np.arange(key.shape[1])] = 1.0
    return w * avail.any(axis=0)


def _softmax_weights(logit: np.ndarray, avail: np.ndarray) -> np.ndarray:
    logit = np.where(avail, logit, -np.inf)
    top = logit.max(axis=0)
    finite = np.isfinite(top)
    with np.errstate(invalid="ignore"):
        e = np.exp(logit - np.where(finite, top, 0.0))
    w = e / np.where(finite, e.sum(axis=0), 1.0)
    # rows where no available candidate has a finite logit: the first available one takes all
    fallback = _mince_weights(np.zeros(logit.shape), avail)
    return np.where(finite, w, fallback)


def fuse(
    candidates: list[SparseRows],
    seq_ptr,
    labels=None,
    *,
    function: str = "mince",
    level: str = "sequence",
    metric=None,
    top_k: int = 10,
    vocab_size: int,
    weighting: str = "softmin",
    tau: float | None = None,
    paper_rewards: bool = False,
    outside: str = "tail",
) -> tuple[SparseRows, dict]:
    """Fuse candidates (candidates[0] = the target's own) into one SparseRows over the same rows.

    seq_ptr: int [S+1], row offsets of the sequences (blocks). labels: int [R], the real target
    token of each row (needed at token level). metric: sequence level, float [C, S] costs from
    `sequence_metric`; token level, None (computed by `token_nll` with `outside`) or float
    [C, R] costs. Returns (fused rows, stats): stats["wins"][c] = rows where c got the largest
    weight, stats["mean_weight"][c] = its weight averaged over all rows, "empty_rows" = rows no
    candidate had a distribution for (left empty), "rows".
    """
    C = len(candidates)
    if C == 0:
        raise FusionError("fuse: no candidates")
    R = candidates[0].rows
    for c, cand in enumerate(candidates):
        if cand.rows != R:
            raise FusionError(f"fuse: candidate {c} has {cand.rows} rows, the target has {R}")
        if len(cand.ids) and (cand.ids.min() < 0 or cand.ids.max() >= vocab_size):
            raise FusionError(f"fuse: candidate {c} has ids outside [0, vocab_size={vocab_size})")
    if function not in ("mince", "avgce"):
        raise FusionError(f"fusion function {function!r}: expected 'mince' or 'avgce'")
    if level not in ("sequence", "token"):
        raise FusionError(f"fusion level {level!r}: expected 'sequence' or 'token'")
    if weighting not in ("softmin", "paper"):
        raise FusionError(f"fusion weighting {weighting!r}: expected 'softmin' or 'paper'")
    if top_k < 1:
        raise FusionError(f"fuse: top_k={top_k} must be at least 1")
    if tau is not None and not tau > 0:
        raise FusionError(f"fuse: tau={tau} must be positive")
    seq_ptr = np.asarray(seq_ptr, dtype=np.int64)
    if seq_ptr.ndim != 1 or len(seq_ptr) < 1 or seq_ptr[0] != 0 or seq_ptr[-1] != R or (np.diff(seq_ptr) < 0).any():
        raise FusionError(f"fuse: seq_ptr must rise from 0 to the row count {R}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (R,):
            raise FusionError(f"fuse: labels have shape {labels.shape}, expected ({R},)")

    if level == "sequence":
        if metric is None:
            raise FusionError("fuse: sequence level needs metric [candidates, sequences]")
        metric = np.asarray(metric, dtype=np.float64)
        if metric.shape != (C, len(seq_ptr) - 1):
            raise FusionError(f"fuse: metric has shape {metric.shape}, expected {(C, len(seq_ptr) - 1)}")
        cost = np.repeat(metric, np.diff(seq_ptr), axis=1)
    elif metric is None:
        if labels is None:
            raise FusionError("fuse: token level needs labels")
        cost = np.stack([token_nll(cand, labels, vocab_size, outside) for cand in candidates])
    else:
        cost = np.asarray(metric, dtype=np.float64)
        if cost.shape != (C, R):
            raise FusionError(f"fuse: token metric has shape {cost.shape}, expected {(C, R)}")

    avail = np.stack([cand.counts > 0 for cand in candidates])
    with np.errstate(over="ignore"):
        reward = paper_reward(cost).astype(np.float64) if paper_rewards else np.exp(-cost)
    if function == "mince":
        w = _mince_weights(-reward if paper_rewards else cost, avail)
    elif weighting == "paper":
        w = _softmax_weights(reward, avail)
        if paper_rewards:
            w = _bf16(w).astype(np.float64)
    else:
        w = _softmax_weights(-cost / (tau or DEFAULT_TAU[level]), avail)

    rows, ids, probs, tail = [], [], [], np.zeros(R)
    for c, cand in enumerate(candidates):
        row, p, t = _entries(cand)
        wr = w[c][row]
        keep = (wr > 0) & (p > 0)
        rows.append(row[keep])
        ids.append(cand.ids[keep].astype(np.int64))
        probs.append(p[keep] * wr[keep])
        tail += w[c] * t
    out = _merge_truncate(np.concatenate(rows), np.concatenate(ids), np.concatenate(probs), tail, R, top_k, vocab_size)

    best = np.argmax(w, axis=0)
    has = avail.any(axis=0)
    stats = {
        "rows": R,
        "wins": np.bincount(best[has], minlength=C).tolist(),
        "mean_weight": (w.sum(axis=1) / max(R, 1)).tolist(),
        "empty_rows": int(R - has.sum()),
    }
    return out, stats


def _merge_truncate(row, ids, p, tail, R, top_k, vocab_size) -> SparseRows:
    """Add up duplicate (row, id) entries, sort rows by descending probability, keep top_k."""
    key = row * vocab_size + ids
    order = np.argsort(key, kind="stable")
    key, p = key[order], p[order]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    p = np.add.reduceat(p, start) if len(key) else p
    key = key[start]
    row, ids = key // vocab_size, key % vocab_size
    # rows are short (at most the candidates' summed widths): sort them as a padded matrix
    counts = np.bincount(row, minlength=R)
    col = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    neg = np.full((R, int(counts.max(initial=0))), np.inf)
    neg[row, col] = -p
    by_p = np.argsort(neg, axis=1, kind="stable")  # stable: equal probabilities stay in id order
    neg = np.take_along_axis(neg, by_p, axis=1)
    grid_ids = np.zeros(neg.shape, dtype=np.int64)
    grid_ids[row, col] = ids
    grid_ids = np.take_along_axis(grid_ids, by_p, axis=1)
    rank = np.arange(neg.shape[1])
    keep = rank < np.minimum(counts, top_k)[:, None]
    dropped = (rank >= top_k) & (rank < counts[:, None])
    tail = tail - np.where(dropped, neg, 0.0).sum(axis=1)
    return SparseRows(
        counts=np.minimum(counts, top_k).astype(np.int32),
        ids=grid_ids[keep].astype(np.int32),
        logprobs=np.log(-neg[keep]).astype(np.float32),
        tail=np.clip(tail, 0.0, 1.0).astype(np.float32),
    )
