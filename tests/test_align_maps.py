"""The compiled vocabulary-map searches give the plain rules' answers: the byte trie the
FirstToken rule's, the search through shared characters the search by length's (which the
fixture test ties to the original's find_best_mapping), on real vocabularies up to 151k."""

import numpy as np
import pytest

from fusion.align import token_view
from fusion.align.vocab import FirstToken, byte_trie, nearest_strings, spelled_as_target

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


@pytest.mark.parametrize("source,target", [("qwen3", "llama2"), ("llama2", "qwen3"), ("gpt2", "mistral-7b-v0.1")])
def test_shared_character_search_is_the_length_search(shared, source, target):
    s, t = load(shared, source), load(shared, target)
    spelled = spelled_as_target(s, t)
    misses = [x for x in spelled if x and x not in t.vocab]
    rng = np.random.default_rng(1)
    queries = [misses[i] for i in rng.choice(len(misses), 400, replace=False)] + ["", "x", "\u4f60\u597d", "ĠĠĠĠĠĠĠĠ"]
    queries = [q for q in queries if q]
    assert (nearest_strings(queries, t.strings) == nearest_strings(queries, t.strings, shared_search=False)).all()
