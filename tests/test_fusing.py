import math

import numpy as np
import pytest
import torch

from fusion.errors import FusionError
from fusion.fusing import fuse, paper_reward, sequence_metric, token_nll
from fusion.sparse import SparseRows

V, R, C = 50, 40, 3
SEQ_PTR = np.array([0, 7, 7, 25, 40])  # one empty sequence


def random_rows(rng, empty_frac=0.0, max_k=8, labels=None):
    counts = rng.integers(1, max_k + 1, R)
    counts[rng.random(R) < empty_frac] = 0
    ids, lps, tails = [], [], []
    for r, k in enumerate(counts):
        row_ids = rng.permutation(V)[:k]
        if labels is not None and k and rng.random() < 0.5:
            row_ids[rng.integers(k)] = labels[r] if labels[r] not in row_ids else row_ids[0]
        tail = rng.random() * 0.3 if rng.random() < 0.8 else 0.0
        p = rng.dirichlet(np.ones(k)) * (1 - tail)
        order = np.argsort(-p)
        ids.append(row_ids[order])
        lps.append(np.log(p[order]))
        tails.append(tail)
    return SparseRows(
        counts.astype(np.int32),
        np.concatenate(ids).astype(np.int32),
        np.concatenate(lps).astype(np.float32),
        np.array(tails, dtype=np.float32),
    )


def make_candidates(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, R)
    cands = [random_rows(rng, 0.0, labels=labels)] + [random_rows(rng, 0.25, labels=labels) for _ in range(C - 1)]
    return cands, labels, rng


def dense(rows):
    """[R, V] probabilities and [R] tails, each row renormalised to 1 (as fuse does)."""
    P, T = np.zeros((rows.rows, V)), rows.tail.astype(np.float64).copy()
    ptr = rows.ptr
    for r in range(rows.rows):
        for j in range(ptr[r], ptr[r + 1]):
            P[r, rows.ids[j]] += math.exp(float(rows.logprobs[j]))
        total = P[r].sum() + T[r]
        if total > 0:
            P[r] /= total
            T[r] /= total
    return P, T


def reference(cands, labels, function, level, metric, top_k, weighting="softmin", tau=None, paper=False):
    """Row by row, the plain way."""
    dens = [dense(c) for c in cands]
    out_P, out_T = np.zeros((R, V)), np.zeros(R)
    seq_of_row = np.repeat(np.arange(len(SEQ_PTR) - 1), np.diff(SEQ_PTR))
    tau = tau or (0.1 if level == "sequence" else 1.0)
    for r in range(R):
        avail = [c for c in range(C) if cands[c].counts[r] > 0]
        if not avail:
            continue
        cost = {}
        for c in avail:
            if level == "sequence":
                cost[c] = metric[c, seq_of_row[r]]
            else:
                listed = set(cands[c].ids[cands[c].ptr[r] : cands[c].ptr[r + 1]].tolist())
                p = dens[c][0][r, labels[r]] if labels[r] in listed else dens[c][1][r] / (V - len(listed))
                cost[c] = -math.log(p) if p > 0 else math.inf
        w = {}
        if function == "mince":
            key = (lambda c: (-float(paper_reward(cost[c])), c)) if paper else (lambda c: (cost[c], c))
            w[min(avail, key=key)] = 1.0
        elif weighting == "paper":
            e = {c: math.exp(math.exp(-cost[c])) for c in avail}
            w = {c: e[c] / sum(e.values()) for c in avail}
        elif all(math.isinf(cost[c]) for c in avail):
            w[avail[0]] = 1.0
        else:
            m = min(cost.values())
            e = {c: math.exp(-(cost[c] - m) / tau) for c in avail}
            w = {c: e[c] / sum(e.values()) for c in avail}
        P = sum(w[c] * dens[c][0][r] for c in w)
        T = sum(w[c] * dens[c][1][r] for c in w)
        order = sorted(np.flatnonzero(P > 0), key=lambda i: (-P[i], i))
        for i in order[top_k:]:
            T += P[i]
            P[i] = 0.0
        out_P[r], out_T[r] = P, T
    return out_P, out_T


def densify(rows):
    P = np.zeros((rows.rows, V))
    row = np.repeat(np.arange(rows.rows), rows.counts)
    np.add.at(P, (row, rows.ids), np.exp(rows.logprobs.astype(np.float64)))
    return P, rows.tail.astype(np.float64)


@pytest.mark.parametrize("function", ["mince", "avgce"])
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("top_k", [3, 30])
def test_matches_dense_reference(function, level, top_k):
    cands, labels, rng = make_candidates()
    metric = rng.uniform(0.5, 1.5, (C, len(SEQ_PTR) - 1)) if level == "sequence" else None
    out, stats = fuse(cands, SEQ_PTR, labels, function=function, level=level, metric=metric, top_k=top_k, vocab_size=V)
    P, T = densify(out)
    ref_P, ref_T = reference(cands, labels, function, level, metric, top_k)
    np.testing.assert_allclose(P, ref_P, rtol=0, atol=1e-6)
    np.testing.assert_allclose(T, ref_T, rtol=0, atol=1e-6)
    assert stats["rows"] == R and sum(stats["wins"]) == R and stats["empty_rows"] == 0
    assert sum(stats["mean_weight"]) == pytest.approx(1.0)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_paper_weights_and_rewards_match_reference(level):
    cands, labels, rng = make_candidates(1)
    metric = rng.uniform(1.5, 2.5, (C, len(SEQ_PTR) - 1)) if level == "sequence" else None
    out, _ = fuse(cands, SEQ_PTR, labels, function="avgce", level=level, metric=metric, vocab_size=V, weighting="paper")
    ref_P, ref_T = reference(cands, labels, "avgce", level, metric, 10, weighting="paper")
    P, T = densify(out)
    np.testing.assert_allclose(P, ref_P, rtol=0, atol=1e-6)
    np.testing.assert_allclose(T, ref_T, rtol=0, atol=1e-6)
    out, _ = fuse(cands, SEQ_PTR, labels, function="mince", level=level, metric=metric, vocab_size=V, paper_rewards=True)
    ref_P, ref_T = reference(cands, labels, "mince", level, metric, 10, paper=True)
    np.testing.assert_allclose(densify(out)[0], ref_P, rtol=0, atol=1e-6)


def test_output_rows_are_sorted_and_sum_to_one():
    cands, labels, _ = make_candidates(2)
    for top_k in (1, 4, 100):
        out, _ = fuse(cands, SEQ_PTR, labels, function="avgce", level="token", top_k=top_k, vocab_size=V)
        assert out.counts.max() <= top_k and out.counts.min() >= 1
        row = np.repeat(np.arange(R), out.counts)
        total = np.bincount(row, weights=np.exp(out.logprobs.astype(np.float64)), minlength=R) + out.tail
        np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-6)
        same_row = row[1:] == row[:-1]
        assert (np.diff(out.logprobs)[same_row] <= 0).all()
        assert out.ids.dtype == np.int32 and out.logprobs.dtype == np.float32


def one_row(ids, probs, tail):
    return SparseRows(
        np.array([len(ids)], np.int32), np.array(ids, np.int32), np.log(np.array(probs, np.float32)), np.array([tail], np.float32)
    )


def test_collisions_add_and_truncation_moves_mass_to_tail():
    a = one_row([5, 1, 2], [0.4, 0.3, 0.2], 0.1)
    b = one_row([3, 5], [0.5, 0.3], 0.2)
    # equal costs: equal weights; id 5 gets 0.5 * 0.4 + 0.5 * 0.3
    out, stats = fuse([a, b], [0, 1], [5], function="avgce", level="sequence", metric=[[1.0], [1.0]], top_k=2, vocab_size=8)
    assert out.ids.tolist() == [5, 3]
    np.testing.assert_allclose(np.exp(out.logprobs), [0.35, 0.25], rtol=1e-6)
    # tail: 0.5 * 0.1 + 0.5 * 0.2, plus the dropped ids 1 (0.15) and 2 (0.1)
    np.testing.assert_allclose(out.tail, [0.4], rtol=1e-6)
    assert stats == {"rows": 1, "wins": [1, 0], "mean_weight": [0.5, 0.5], "empty_rows": 0}


def test_pinned_tiny_case():
    target = SparseRows(
        np.array([2, 1, 2], np.int32),
        np.array([0, 1, 2, 3, 1], np.int32),
        np.log(np.array([0.6, 0.3, 0.9, 0.5, 0.5], np.float32)),
        np.array([0.1, 0.1, 0.0], np.float32),
    )
    source = SparseRows(
        np.array([1, 0, 2], np.int32),
        np.array([1, 3, 2], np.int32),
        np.log(np.array([0.8, 0.7, 0.2], np.float32)),
        np.array([0.2, 0.0, 0.1], np.float32),
    )
    labels = np.array([1, 2, 3])
    # token level: row 0 the source (0.8 > 0.3), row 1 the target (the source has no row),
    # row 2 the source (0.7 > 0.5)
    out, stats = fuse([target, source], [0, 3], labels, function="mince", level="token", vocab_size=6)
    assert out.counts.tolist() == [1, 1, 2]
    assert out.ids.tolist() == [1, 2, 3, 2]
    np.testing.assert_allclose(np.exp(out.logprobs), [0.8, 0.9, 0.7, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out.tail, [0.2, 0.1, 0.1], rtol=1e-6)
    assert stats["wins"] == [1, 2]
    # AvgCE at token level, tau = 1: weights proportional to p(label), 0.3 : 0.8 at row 0
    out, stats = fuse([target, source], [0, 3], labels, function="avgce", level="token", vocab_size=6)
    w = 0.8 / 1.1
    row0 = {0: (1 - w) * 0.6, 1: (1 - w) * 0.3 + w * 0.8}
    assert out.ids[:2].tolist() == [1, 0]
    np.testing.assert_allclose(np.exp(out.logprobs[:2]), [row0[1], row0[0]], rtol=1e-6)
    np.testing.assert_allclose(out.tail[0], (1 - w) * 0.1 + w * 0.2, rtol=1e-6)
    np.testing.assert_allclose(stats["mean_weight"][1], (w + 0 + 0.7 / 1.2) / 3, rtol=1e-6)


def test_label_outside_support():
    # the target lists only id 0; the label 4 sits in its tail of 0.5 over 9 unlisted ids
    target = one_row([0], [0.5], 0.5)
    source = one_row([1, 2], [0.6, 0.4], 0.0)
    np.testing.assert_allclose(token_nll(target, [4], 10), [math.log(18)])
    assert token_nll(target, [4], 10, outside="unknown")[0] == math.inf
    assert token_nll(source, [4], 10)[0] == math.inf  # no tail: no mass
    out, _ = fuse([target, source], [0, 1], [4], level="token", vocab_size=10)
    assert out.ids.tolist() == [0]
    # every candidate impossible: the target, which comes first, wins
    out, stats = fuse([target, source], [0, 1], [4], level="token", vocab_size=10, outside="unknown")
    assert out.ids.tolist() == [0] and stats["wins"] == [1, 0]
    out, _ = fuse([target, source], [0, 1], [4], function="avgce", level="token", vocab_size=10, outside="unknown")
    assert out.ids.tolist() == [0]


def test_sources_without_rows_never_win_and_empty_rows_stay_empty():
    empty = SparseRows(np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.float32))
    target = one_row([0], [0.5], 0.5)
    for function in ("mince", "avgce"):
        out, stats = fuse([target, empty], [0, 1], [0], function=function, metric=[[9.0], [0.0]], vocab_size=4)
        assert out.ids.tolist() == [0] and stats["wins"] == [1, 0] and stats["mean_weight"] == [1.0, 0.0]
    out, stats = fuse([empty, empty], [0, 1], [0], metric=[[1.0], [0.0]], vocab_size=4)
    assert out.counts.tolist() == [0] and stats["empty_rows"] == 1 and stats["wins"] == [0, 0]


def test_sequence_level_winner_without_a_row_yields_to_the_next_best():
    t = SparseRows(np.array([1, 1], np.int32), np.array([0, 0], np.int32), np.zeros(2, np.float32), np.zeros(2, np.float32))
    s1 = SparseRows(np.array([1, 0], np.int32), np.array([1], np.int32), np.zeros(1, np.float32), np.zeros(2, np.float32))
    s2 = SparseRows(np.array([1, 1], np.int32), np.array([2, 2], np.int32), np.zeros(2, np.float32), np.zeros(2, np.float32))
    out, _ = fuse([t, s1, s2], [0, 2], None, metric=[[3.0], [1.0], [2.0]], vocab_size=4)
    assert out.ids.tolist() == [1, 2]


def test_sequence_metrics():
    nll, nbytes, ntok = np.array([100.0, 30.0]), np.array([200, 60]), np.array([50, 10])
    np.testing.assert_array_equal(sequence_metric("nll_per_byte", nll, nbytes, ntok), [0.5, 0.5])
    np.testing.assert_array_equal(sequence_metric("ce_per_token", nll, nbytes, ntok), [2.0, 3.0])
    with pytest.raises(FusionError, match="seq_bytes"):
        sequence_metric("nll_per_byte", nll, None, ntok)
    with pytest.raises(FusionError, match="sequence 1"):
        sequence_metric("ce_per_token", nll, nbytes, [5, 0])
    with pytest.raises(FusionError, match="bits"):
        sequence_metric("bits", nll, nbytes, ntok)


def test_paper_reward_is_torch_bf16_bit_for_bit():
    ce = np.random.default_rng(0).uniform(0.0, 12.0, 100_000)
    expected = (1 / torch.exp(torch.tensor(ce.tolist(), dtype=torch.bfloat16))).float().numpy()
    np.testing.assert_array_equal(paper_reward(ce), expected)


def test_paper_ties_go_to_the_target():
    # per-token CE 2.0 (target) vs 1.999 (source): one bf16 reward, so the target wins in the
    # paper's comparison, while the exact comparison picks the source
    target, source = one_row([0], [1.0], 0.0), one_row([1], [1.0], 0.0)
    metric = sequence_metric("ce_per_token", [[200.0], [199.9]], None, [[100], [100]])
    assert paper_reward(metric[0]) == paper_reward(metric[1])
    out, stats = fuse([target, source], [0, 1], None, metric=metric, vocab_size=2, paper_rewards=True)
    assert out.ids.tolist() == [0] and stats["wins"] == [1, 0]
    out, stats = fuse([target, source], [0, 1], None, metric=metric, vocab_size=2)
    assert out.ids.tolist() == [1] and stats["wins"] == [0, 1]


def test_paper_avgce_weights_are_nearly_uniform():
    # NOTES.md defect 5: CE 1.8 vs 2.2 gives 0.514 / 0.486; the default weights do not
    a, b = one_row([0], [1.0], 0.0), one_row([1], [1.0], 0.0)
    _, paper = fuse([a, b], [0, 1], None, function="avgce", metric=[[1.8], [2.2]], vocab_size=2, weighting="paper")
    np.testing.assert_allclose(paper["mean_weight"], [0.5136, 0.4864], atol=1e-4)
    _, bf16 = fuse([a, b], [0, 1], None, function="avgce", metric=[[1.8], [2.2]], vocab_size=2, weighting="paper", paper_rewards=True)
    # torch.softmax(1 / torch.exp(torch.tensor([1.8, 2.2], dtype=torch.bfloat16)), 0): bf16 weights
    # that do not even sum to 1
    assert bf16["mean_weight"] == [0.515625, 0.486328125]
    _, soft = fuse([a, b], [0, 1], None, function="avgce", metric=[[1.8], [2.2]], vocab_size=2)
    np.testing.assert_allclose(soft["mean_weight"], [1 / (1 + math.exp(-4)), 1 / (1 + math.exp(4))], rtol=1e-12)


def test_bad_input_names_the_culprit():
    cands, labels, _ = make_candidates()
    with pytest.raises(FusionError, match="candidate 1 has 39 rows"):
        fuse([cands[0], cands[1].slice(0, 39)], SEQ_PTR, labels, metric=np.zeros((2, 4)), vocab_size=V)
    with pytest.raises(FusionError, match="seq_ptr"):
        fuse(cands, [0, 10], labels, metric=np.zeros((C, 1)), vocab_size=V)
    with pytest.raises(FusionError, match="metric has shape"):
        fuse(cands, SEQ_PTR, labels, metric=np.zeros((C, 3)), vocab_size=V)
    with pytest.raises(FusionError, match="candidate 0 has ids outside"):
        fuse(cands, SEQ_PTR, labels, metric=np.zeros((C, 4)), vocab_size=10)
    with pytest.raises(FusionError, match="'maxce'"):
        fuse(cands, SEQ_PTR, labels, function="maxce", metric=np.zeros((C, 4)), vocab_size=V)
