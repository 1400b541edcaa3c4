"""The compiled, banded DTW against the plain-Python full-matrix baseline."""

import editdistance
import numpy as np
import pytest

from fusion.align.dtw import band, certify, diagonal_columns, dtw_band, dtw_path_columns, edit_distance, token_keys
from fusion.align.tokens import codepoints
from tests.baseline_align import dtw_columns


def random_vocab(rng, size, alphabet="ab▁c", longest=4):
    return ["".join(rng.choice(list(alphabet), rng.integers(0, longest + 1))) for _ in range(size)]


def compiled_columns(vocab_a, vocab_b, a, b, first, last, width):
    af, ap = codepoints(vocab_a)
    bf, bp = codepoints(vocab_b)
    count, row_of, used = dtw_path_columns(np.array(a, np.int64), np.array(b, np.int64), af, ap, bf, bp,
                                           np.asarray(first, np.int64), np.asarray(last, np.int64), width)
    return count, row_of, used


def assert_same(vocab_a, vocab_b, a, b, count, row_of):
    expected = dtw_columns([vocab_a[x] for x in a], [vocab_b[x] for x in b])
    assert count.tolist() == [len(c) for c in expected]
    assert [r for r, c in zip(row_of.tolist(), expected) if len(c) == 1] == [c[0] for c in expected if len(c) == 1]


def test_edit_distance_matches_editdistance():
    rng = np.random.default_rng(1)
    words = random_vocab(rng, 300, alphabet="abcé▁", longest=7)
    flat, ptr = codepoints(words)
    scratch = np.empty(16, np.int64)
    for _ in range(2000):
        x, y = rng.integers(0, len(words), 2)
        got = edit_distance(flat, ptr[x], ptr[x + 1], flat, ptr[y], ptr[y + 1], scratch)
        assert got == editdistance.eval(words[x], words[y]), (words[x], words[y])


@pytest.mark.parametrize("seed", range(60))
def test_banded_equals_full_matrix(seed):
    """Small alphabets make ties everywhere (the walk's tie-breaking order matters), narrow
    bands and wrong band centres force the widening fallback."""
    rng = np.random.default_rng(seed)
    vocab_a = random_vocab(rng, 12)
    vocab_b = random_vocab(rng, 9)
    n, m = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    a = rng.integers(0, len(vocab_a), n)
    b = rng.integers(0, len(vocab_b), m)
    first, last = diagonal_columns(n, m)
    if seed % 3 == 1:  # a band centre that is off by a lot
        first = np.clip(first + rng.integers(-m, m), 0, m - 1)
        first = np.maximum.accumulate(first)
        last = first
    count, row_of, _ = compiled_columns(vocab_a, vocab_b, a, b, first, last, width=int(rng.integers(1, 4)))
    assert_same(vocab_a, vocab_b, a, b, count, row_of)


def test_periodic_text():
    """A repeated phrase gives equally cheap paths far from the diagonal."""
    vocab_a = ["ab", "c", "▁d", "e"]
    vocab_b = ["a", "bc", "▁d", "e"]
    a = [0, 1, 2, 3] * 15
    b = [0, 1, 2, 3] * 12 + [0, 0, 0, 0] * 3
    first, last = diagonal_columns(len(a), len(b))
    count, row_of, _ = compiled_columns(vocab_a, vocab_b, a, b, first, last, width=2)
    assert_same(vocab_a, vocab_b, a, b, count, row_of)


def test_certificate_rejects_a_band_that_changes_the_walk():
    """The band forces the path along the wrong diagonal: the banded walk is cheap in the band
    but not the full matrix's, and the certificate must say so."""
    vocab_a, vocab_b = ["x", "y", "zz"], ["x", "y", "zz", "q"]
    a = np.array([0, 1, 2] * 10)
    b = np.array([3, 3, 3, 3, 3, 3] + [0, 1, 2] * 10)
    af, ap = codepoints(vocab_a)
    bf, bp = codepoints(vocab_b)
    sizes = token_keys(a, af, ap) + token_keys(b, bf, bp)
    lo, hi = band(np.arange(len(a)), np.arange(len(a)), len(b), 1)  # centred on the wrong diagonal
    walk = dtw_band(a, b, af, ap, bf, bp, lo, hi)
    assert not certify(*sizes, lo, hi, walk[4], walk[5], *walk[:4])
    lo, hi = np.zeros(len(a), np.int64), np.full(len(a), len(b) - 1, np.int64)
    walk = dtw_band(a, b, af, ap, bf, bp, lo, hi)
    assert certify(*sizes, lo, hi, walk[4], walk[5], *walk[:4])
    count, row_of, used = compiled_columns(vocab_a, vocab_b, a, b, np.arange(len(a)), np.arange(len(a)), 1)
    assert used > 1
    assert_same(vocab_a, vocab_b, a, b, count, row_of)


def test_empty_sides():
    count, row_of, _ = compiled_columns(["a"], ["a"], [], [0, 0], [], [], 4)
    assert count.tolist() == [0, 0] and row_of.tolist() == [-1, -1]
    count, row_of, _ = compiled_columns(["a"], ["a"], [0], [], [0], [0], 4)
    assert len(count) == 0
