"""The compiled vocabulary-map searches give the plain rules' answers on real vocabularies up to
151k: the byte trie and the default map the FirstToken rule's, the nearest-string search a scan of
every target string by its full edit-distance table (the original's find_best_mapping, which the fixture test
also checks a whole map against)."""

import numpy as np
import pytest
from numba import njit

from fusion.align import token_view
from fusion.align.tokens import codepoints
from fusion.align.vocab import FirstToken, byte_trie, default_map, nearest_strings, spelled_as_target

_loaded = {}


def load(shared, name):
    if name not in _loaded:
        from transformers import AutoTokenizer

        path = shared / "assets" / ("model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}")
        _loaded[name] = token_view(AutoTokenizer.from_pretrained(path), name)
    return _loaded[name]


@pytest.mark.parametrize("source,target", [("qwen3", "llama2"), ("gpt2", "qwen3"), ("llama2", "stories260K"),
                                           ("stories260K", "gpt-neox-20b")])
def test_byte_trie_is_the_first_token_rule(shared, source, target):
    s, t = load(shared, source), load(shared, target)
    rng = np.random.default_rng(0)
    ids = rng.choice(np.flatnonzero(s.lengths > 0), min(3000, int((s.lengths > 0).sum())), replace=False)
    first = FirstToken(t)
    trie = byte_trie(t)
    got = trie.firsts(s.data, s.ptr[ids], s.ptr[ids + 1])
    assert [max(g, -1) for g in got.tolist()] == [first(s.token_bytes(int(x))) for x in ids]
    unknowable = [first(s.token_bytes(int(x))) == -1 and s.token_bytes(int(x)) in first.started for x in ids]
    assert ((got == -2) == unknowable).all()
    cut = s.ptr[ids] + np.minimum(1, s.lengths[ids] - 1)  # suffixes, and a leading space
    assert [max(g, -1) for g in trie.firsts(s.data, cut, s.ptr[ids + 1]).tolist()] == \
        [first(s.data[a:b].tobytes()) for a, b in zip(cut, s.ptr[ids + 1])]
    assert [max(g, -1) for g in trie.firsts(s.data, s.ptr[ids], s.ptr[ids + 1], 0x20).tolist()] == \
        [first(b" " + s.token_bytes(int(x))) for x in ids]


@pytest.mark.parametrize("source,target", [("qwen3", "llama2"), ("llama2", "qwen3"), ("qwen3", "gpt-neox-20b"),
                                           ("stories260K", "qwen3")])
def test_default_map_is_the_first_token_rule(shared, source, target):
    s, t = load(shared, source), load(shared, target)
    first = FirstToken(t)

    def plain(x):
        if s.special[x] or s.lengths[x] == 0:
            if x == s.eos_id and t.eos_id >= 0:
                return t.eos_id
            if x == s.bos_id and t.bos_id >= 0:
                return t.bos_id
            return t.unk_id if x == s.unk_id else -1
        data = s.token_bytes(x)
        hit = first(data)
        if hit >= 0 or data in first.started:  # -1 there: the target token is unknowable
            return hit
        return t.unk_id  # bytes the target cannot spell

    assert default_map(s, t).tolist() == [plain(x) for x in range(s.size)]


@njit(cache=True)
def brute_force_nearest(qf, qp, tf, tp):
    """Per query: the first non-empty target in id order at the least Levenshtein distance, from
    the full table of every target."""
    out = np.empty(len(qp) - 1, np.int64)
    for qi in range(len(qp) - 1):
        x = qf[qp[qi]:qp[qi + 1]]
        best, best_id = -1, -1
        for t in range(len(tp) - 1):
            y = tf[tp[t]:tp[t + 1]]
            if len(y) == 0:
                continue
            table = np.zeros((len(x) + 1, len(y) + 1), np.int64)
            table[:, 0] = np.arange(len(x) + 1)
            table[0, :] = np.arange(len(y) + 1)
            for i in range(1, len(x) + 1):
                for j in range(1, len(y) + 1):
                    table[i, j] = min(table[i - 1, j] + 1, table[i, j - 1] + 1,
                                      table[i - 1, j - 1] + (x[i - 1] != y[j - 1]))
            if best_id < 0 or table[len(x), len(y)] < best:
                best, best_id = table[len(x), len(y)], t
        out[qi] = best_id
    return out


def test_brute_force_nearest_is_the_rule():
    targets = ["", "ab", "b", "xyz", "a", "ba"]
    qf, qp = codepoints(["ab", "b", "bb", "zzzz", "aa"])
    tf, tp = codepoints(targets)
    # "bb": "ab", "b" and "ba" are all at 1, the first wins; "zzzz": "xyz" at 3 beats every other at 4
    assert brute_force_nearest(qf, qp, tf, tp).tolist() == [1, 2, 1, 3, 1]


@pytest.mark.parametrize("source,target", [("qwen3", "llama2"), ("llama2", "qwen3"), ("qwen3", "gpt2"),
                                           ("gpt-neox-20b", "qwen3"), ("qwen3", "stories260K"),
                                           ("gpt2", "mistral-7b-v0.1")])
def test_nearest_strings_is_the_brute_force_rule(shared, source, target):
    s, t = load(shared, source), load(shared, target)
    spelled = spelled_as_target(s, t)
    misses = [x for x in spelled if x and x not in t.vocab]
    rng = np.random.default_rng(1)
    queries = [misses[i] for i in rng.choice(len(misses), min(len(misses), 150), replace=False)]
    queries += ["x", "\u4f60\u597d", "ĠĠĠĠĠĠĠĠ", "▁▁▁▁▁▁▁▁▁▁▁▁", "\U0001F600", t.strings[-1] + "q"]
    tf, tp = codepoints(t.strings)
    expected = brute_force_nearest(*codepoints(queries), tf, tp)
    assert nearest_strings(queries, t.strings).tolist() == expected.tolist()
