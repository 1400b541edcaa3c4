"""align_blocks on real tokenizers: the default mode's concrete rows, its rules, bad input, and
the reference mode in our row convention."""

import numpy as np
import pytest

from fusion.align import align_blocks, align_blocks_parallel, token_view, vocab_map
from fusion.align.reference import ONE_HOT, reference_rows
from fusion.errors import FusionError
from tests.baseline_align import default_rows


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusion-cache"))


_loaded = {}


def load(shared, name):
    if name not in _loaded:
        from transformers import AutoTokenizer

        folder = "model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}"
        tok = AutoTokenizer.from_pretrained(shared / "assets" / folder)
        _loaded[name] = (tok, token_view(tok, name))
    return _loaded[name]


def scripted(target, source, text, extra, first=0.6, tail=0.1, target_special=False, source_special=False,
             mode="default"):
    """Align one block whose source rows all say: the real next token with probability `first`,
    the `extra` tokens sharing the rest but `tail`. Returns {target string: probability} and the
    tail per target row, and the stats."""
    (t_tok, t_view), (s_tok, s_view) = target, source
    t = t_tok.encode(text, add_special_tokens=target_special)
    s = s_tok.encode(text, add_special_tokens=source_special)
    extra_ids = [s_view.vocab[e] for e in extra]
    ids = np.array([[x] + extra_ids for x in s]).reshape(len(s), 1 + len(extra))
    rest = (1 - first - tail) / len(extra)
    logprobs = np.log(np.array([[first] + [rest] * len(extra)] * len(s))).reshape(ids.shape)
    stats = {}
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, np.full(len(s), tail), t_view,
                        s_view, None, mode, stats)
    out = []
    for j in range(rows.rows):
        a, b = rows.ptr[j], rows.ptr[j + 1]
        probs = {t_view.strings[i]: round(float(np.exp(lp)), 4) for i, lp in zip(rows.ids[a:b], rows.logprobs[a:b])}
        out.append((t_view.strings[t[j]], probs, round(float(rows.tail[j]), 4)))
    return out, stats


def test_golden_llama2_target_gpt2_source(shared):
    """Dummy space, a 1:n digit group (target splits every digit), newline and tab, a character
    split differently (c|af vs ca|f), a multi-byte character."""
    rows, stats = scripted(load(shared, "llama2"), load(shared, "gpt2"), "Hello world 2023\n\tcafé", ["Ġthe", "2"])
    assert rows == [
        ("▁Hello", {"▁Hello": 0.6, "▁▁": 0.15, "▁": 0.15}, 0.1),  # " Hello" / " " + " the" / " " + "2"
        ("▁world", {"▁world": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),
        ("▁", {"▁": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),  # " 20" begins with the target's "▁"
        ("2", {"2": 0.7059, "the": 0.1765}, 0.1176),  # " " committed: " 20" -> "20", " the" -> "the"
        ("0", {"0": 0.8571}, 0.1429),  # " 2" committed: only " 20" agrees
        ("2", {"2": 0.75, "▁the": 0.15}, 0.1),  # "23" -> "2" and "2" -> "2" add up
        ("3", {"3": 0.7059}, 0.2941),  # "2" committed: "23" -> "3"; "2" itself ends there: unknown
        ("<0x0A>", {"<0x0A>": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),
        ("<0x09>", {"<0x09>": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),
        ("ca", {"c": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),
        ("f", {"f": 0.8571}, 0.1429),  # "a" committed: "af" -> "f"
        ("é", {"é": 0.6, "▁the": 0.15, "2": 0.15}, 0.1),
    ]
    assert stats == {"rows": 12, "covered": 12, "coverage": 1.0, "shared": 7, "conditioned": 4, "continued": 0, "dummy": 1,
                     "special": 0}


def test_golden_runs_of_spaces_neox_target_llama2_source(shared):
    rows, _ = scripted(load(shared, "gpt-neox-20b"), load(shared, "llama2"), "a   b\n\n    c", ["▁▁"])
    assert rows == [
        ("a", {"a": 0.6, "Ġ": 0.3}, 0.1),  # the source's dummy space is committed: "▁a" -> "a"
        ("   ", {"  ": 0.9}, 0.1),  # both candidates are "▁▁": collision adds; NeoX's added "  " wins
        ("b", {"b": 0.6, "Ġ": 0.3}, 0.1),
        ("ĊĊ", {"Ċ": 0.6, "  ": 0.3}, 0.1),
        ("    ", {"   ": 0.6, "  ": 0.3}, 0.1),
        ("c", {"c": 0.6, "Ġ": 0.3}, 0.1),
    ]


def test_golden_tabs_and_spaces_llama2_target_neox_source(shared):
    rows, _ = scripted(load(shared, "llama2"), load(shared, "gpt-neox-20b"), "x  =  1\n\t\ty", ["Ġ"])
    assert rows[:3] == [
        ("▁x", {"▁x": 0.6, "▁▁": 0.3}, 0.1),
        ("▁", {"▁▁": 0.6, "▁": 0.3}, 0.1),
        ("▁=", {"▁": 0.6}, 0.4),  # " " committed; the candidate " " ends there: unknown -> tail
    ]
    assert rows[6] == ("<0x09>", {"<0x09>": 0.8571}, 0.1429)  # "\n" committed: " " disagrees and drops out


def test_bos_on_the_target_only_and_byte_pieces(shared):
    rows, _ = scripted(load(shared, "mistral-7b-v0.1"), load(shared, "openllama-v1"), "Straße 你好", ["▁"],
                       target_special=True)
    assert rows == [
        ("<s>", {}, 1.0),  # predicting BOS: nothing on the source side
        ("▁Stra", {"▁Stra": 0.6, "▁": 0.3}, 0.1),
        ("ße", {"▁": 0.3}, 0.7),  # the source's byte <0xC3> starts "ß", which Mistral spells "ße"...: unknown
        ("▁", {"▁": 0.9}, 0.1),
        ("你", {"▁": 0.3}, 0.7),
        ("好", {"▁": 0.3}, 0.7),
    ]


def test_eos_on_both_sides_shares_the_distribution(shared):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "llama2"), load(shared, "gpt2")
    text = "The end."
    t = t_tok.encode(text, add_special_tokens=False) + [t_view.eos_id]
    s = s_tok.encode(text, add_special_tokens=False) + [s_view.eos_id]
    ids = np.array([[s_view.eos_id, s_view.vocab["Ġthe"]]] * len(s))
    logprobs = np.log(np.array([[0.7, 0.2]] * len(s)))
    stats = {}
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, np.full(len(s), 0.1), t_view, s_view,
                        stats=stats)
    last = slice(rows.ptr[-2], rows.ptr[-1])
    assert rows.ids[last].tolist() == [t_view.eos_id, t_view.vocab["▁the"]]
    assert np.allclose(np.exp(rows.logprobs[last]), [0.7, 0.2]) and stats["special"] == 1
    s_only = s[:-1]  # EOS on the target only: its row gets nothing
    rows = align_blocks([text], t, [0, len(t)], s_only, [0, len(s_only)], ids[:-1], logprobs[:-1],
                        np.full(len(s_only), 0.1), t_view, s_view)
    assert rows.counts[-1] == 0 and rows.counts[:-1].all()


def test_source_bos_is_skipped(shared):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "gpt2"), load(shared, "llama2")
    text = "Fusion works."
    t = t_tok.encode(text, add_special_tokens=False)
    s = s_tok.encode(text, add_special_tokens=True)  # [BOS, ...]: row 0 predicts BOS itself
    ids = np.array([[x] for x in s[1:]] + [[s[-1]]])
    ids = np.vstack([[[s_view.bos_id]], ids[:-1]])
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, np.zeros(ids.shape), np.zeros(len(s)), t_view,
                        s_view)
    first = rows.ids[rows.ptr[0] : rows.ptr[1]]
    assert first.tolist() == [t[0]]  # from the source's row 1 (first text token), not its BOS row


def test_collisions_add_and_tail_is_kept(shared):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "llama2"), load(shared, "gpt2")
    text = " 2023"
    t = t_tok.encode(text, add_special_tokens=False)
    s = s_tok.encode(text, add_special_tokens=False)
    assert [s_view.strings[x] for x in s] == ["Ġ20", "23"]
    # row 0: Llama's dummy space, then " 20", " 2" or " 1": all begin with Llama's "▁▁" (it splits
    # digits); an id past the vocabulary is unknown
    ids = np.array([[s_view.vocab["Ġ20"], s_view.vocab["Ġ2"], s_view.vocab["Ġ1"], s_view.size + 5]] * len(s))
    logprobs = np.log(np.array([[0.4, 0.2, 0.1, 0.05]] * len(s)))
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, np.full(len(s), 0.25), t_view, s_view)
    assert t_view.strings[t[0]] == "▁▁"
    assert rows.ids[: rows.counts[0]].tolist() == [t_view.vocab["▁▁"]]
    assert np.isclose(np.exp(rows.logprobs[0]), 0.7)
    assert np.isclose(rows.tail[0], 0.3)  # the source's own tail 0.25 plus the unknown id's 0.05


def test_mismatched_text_names_the_block(shared):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "llama2"), load(shared, "gpt2")
    texts = ["first block", "second block"]
    t = [t_tok.encode(x, add_special_tokens=False) for x in texts]
    s = [s_tok.encode(x, add_special_tokens=False) for x in ["first block", "second blocks"]]
    tt, ss = np.concatenate(t), np.concatenate(s)
    with pytest.raises(FusionError, match=r"block 1, source tokens \(gpt2\).*13 bytes from the tokens, 12 in the text; first difference at byte 12: "
                                         r"tokens give 'second blocks', the text has 'second block'"):
        align_blocks(texts, tt, np.cumsum([0] + [len(x) for x in t]), ss, np.cumsum([0] + [len(x) for x in s]),
                     np.zeros((len(ss), 1), np.int64), np.zeros((len(ss), 1)), np.zeros(len(ss)), t_view, s_view)
    many = texts * 4  # in parallel, the block is still named by its place in the whole input
    t_many = t * 4
    s_many = [s_tok.encode(x, add_special_tokens=False) for x in many]
    s_many[5] = s[1]
    with pytest.raises(FusionError, match=r"block 5, source tokens"):
        align_blocks_parallel(many, np.concatenate(t_many), np.cumsum([0] + [len(x) for x in t_many]),
                              np.concatenate(s_many), np.cumsum([0] + [len(x) for x in s_many]),
                              np.zeros((len(ss) * 4, 1), np.int64), np.zeros((len(ss) * 4, 1)), np.zeros(len(ss) * 4),
                              t_view, s_view, workers=2)
    with pytest.raises(FusionError, match="target token id 99999"):
        align_blocks(["x"], [99999], [0, 1], [87], [0, 1], [[0]], [[0.0]], [0.0], t_view, s_view)
    with pytest.raises(FusionError, match="source_topk_ids"):
        align_blocks(["x"], t_tok.encode("x", add_special_tokens=False), [0, 1], [87], [0, 1], [[0], [0]], [[0.0]],
                     [0.0], t_view, s_view)


@pytest.mark.parametrize("mode", ["default", "reference-hard", "reference-soft"])
def test_empty_blocks(shared, mode):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "mistral-7b-v0.1"), load(shared, "gpt2")
    texts = ["", "one block", "", ""]
    t = [t_tok.encode(x, add_special_tokens=False) for x in texts]
    s = [s_tok.encode(x, add_special_tokens=False) for x in texts]
    tt, ss = np.concatenate(t).astype(np.int64), np.concatenate(s).astype(np.int64)
    ids = np.array([[x] for x in ss])
    rows = align_blocks(texts, tt, np.cumsum([0] + [len(x) for x in t]), ss, np.cumsum([0] + [len(x) for x in s]),
                        ids, np.zeros(ids.shape), np.zeros(len(ss)), t_view, s_view, None, mode)
    assert rows.rows == len(tt)
    nothing = align_blocks([], [], [0], [], [0], np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), t_view, s_view,
                           None, mode)
    assert nothing.rows == 0


def random_topk(rng, s, size, k=6):
    """Synthetic top-k holding the real next source token (as a good model's would), then random ids."""
    ids = rng.integers(0, size, (len(s), k))
    ids[:, 0] = s
    raw = np.sort(rng.random((len(s), k)), axis=1)[:, ::-1] + 0.05
    probs = 0.9 * raw / raw.sum(1, keepdims=True)
    return ids, np.log(probs), np.full(len(s), 0.1)


@pytest.mark.parametrize("pair", [("llama2", "gpt2"), ("gpt-neox-20b", "openllama-v1"), ("gpt2", "mistral-7b-v0.1")])
def test_compiled_default_equals_the_python_baseline(shared, pair):
    from fusion.align.vocab import first_token

    (t_tok, t_view), (s_tok, s_view) = load(shared, pair[0]), load(shared, pair[1])
    corpus = (shared / "assets" / "corpus-python311-docs-en" / "python311_docs.txt").read_text()
    rng = np.random.default_rng(0)
    for _ in range(3):
        at = int(rng.integers(0, len(corpus) - 3000))
        text = corpus[at : at + 1500]
        t = t_tok.encode(text, add_special_tokens=False)
        s = s_tok.encode(text, add_special_tokens=False)
        ids, logprobs, tail = random_topk(rng, s, s_view.size)
        direct = vocab_map(s_view, t_view, "default")
        rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, tail, t_view, s_view, direct)
        expected = default_rows(text.encode(), [t_view.token_bytes(x) for x in t], [s_view.token_bytes(x) for x in s],
                                ids, logprobs, tail, [s_view.token_bytes(x) for x in range(s_view.size)], direct,
                                first_token(t_view))
        for j, (probs, rest) in enumerate(expected):
            a, b = rows.ptr[j], rows.ptr[j + 1]
            got = dict(zip(rows.ids[a:b].tolist(), np.exp(rows.logprobs[a:b].astype(np.float64))))
            assert got.keys() == probs.keys(), j
            assert np.allclose([got[y] for y in probs], list(probs.values()), rtol=1e-5), j
            assert np.isclose(rows.tail[j], rest, rtol=1e-5, atol=1e-7), j
            assert (np.diff(rows.logprobs[a:b]) <= 0).all()


def test_default_covers_more_than_the_reference(shared):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "mistral-7b-v0.1"), load(shared, "gpt2")
    text = (shared / "assets" / "corpus-sotu-en" / "sotu.txt").read_text()[50000:58000]
    t = t_tok.encode(text, add_special_tokens=False)
    s = s_tok.encode(text, add_special_tokens=False)
    ids, logprobs, tail = random_topk(np.random.default_rng(1), s, s_view.size)
    cover = {}
    for mode in ("default", "reference-hard", "reference-soft"):
        stats = {}
        align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, tail, t_view, s_view, None, mode, stats)
        cover[mode] = stats["coverage"]
    assert cover["default"] > 0.95 and cover["default"] > cover["reference-soft"] >= cover["reference-hard"]


def test_reference_mode_is_the_paper_shifted_by_one_row(shared):
    """Our target row j+1 = the paper's row j (renormalised); our row 0 has nothing; one-hots on
    the current token become one entry with log-probability 0."""
    (t_tok, t_view), (s_tok, s_view) = load(shared, "mistral-7b-v0.1"), load(shared, "gpt2")
    text = "Fusion of knowledge: 42 models,\n\teach with its own tokenizer."
    t = np.array(t_tok.encode(text, add_special_tokens=False))
    s = np.array(s_tok.encode(text, add_special_tokens=False))
    ids, logprobs, tail = random_topk(np.random.default_rng(2), s, s_view.size)
    hard = vocab_map(s_view, t_view, "reference-hard")
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs, tail, t_view, s_view, hard,
                        "reference-hard")
    from fusion.align.dtw import dtw_path_columns, text_columns
    from fusion.align.streams import place, spans

    t_start = spans(*place(t_view, t, text.encode(), "t"))
    s_prefix, s_len = place(s_view, s, text.encode(), "s")
    first, last = text_columns(spans(s_prefix, s_len), s_len, t_start)
    count, row_of, _ = dtw_path_columns(s, t, *s_view.stripped_codepoints, *t_view.stripped_codepoints, first, last)
    shifted = np.vstack([ids[1:], np.full((1, ids.shape[1]), -1)])
    shifted_lp = np.vstack([logprobs[1:], np.zeros((1, ids.shape[1]))])
    ptr, idx, val, kind = reference_rows(s, t, count, row_of, hard, hard, hard, t_view.canonical, 1, shifted,
                                         shifted_lp)
    assert rows.counts[0] == 0
    for j in range(len(t) - 1):
        a, b = rows.ptr[j + 1], rows.ptr[j + 2]
        assert rows.ids[a:b].tolist() == idx[ptr[j] : ptr[j + 1]].tolist()
        if kind[j] == ONE_HOT:
            assert rows.ids[a:b].tolist() == [t[j]] and rows.logprobs[a] == 0
        elif b > a:
            expected = val[ptr[j] : ptr[j + 1]] - np.log(np.exp(val[ptr[j] : ptr[j + 1]]).sum())
            assert np.allclose(rows.logprobs[a:b], expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "reference-hard", "reference-soft"])
def test_parallel_equals_serial(shared, mode):
    (t_tok, t_view), (s_tok, s_view) = load(shared, "llama2"), load(shared, "gpt-neox-20b")
    corpus = (shared / "assets" / "corpus-sotu-en" / "sotu.txt").read_text()
    texts = [corpus[i * 700 : i * 700 + 650] for i in range(9)]
    t = [t_tok.encode(x, add_special_tokens=False) for x in texts]
    s = [s_tok.encode(x, add_special_tokens=False) for x in texts]
    tt, ss = np.concatenate(t), np.concatenate(s)
    ids, logprobs, tail = random_topk(np.random.default_rng(3), ss, s_view.size)
    args = (texts, tt, np.cumsum([0] + [len(x) for x in t]), ss, np.cumsum([0] + [len(x) for x in s]), ids, logprobs,
            tail, t_view, s_view, None, mode)
    one, two = {}, {}
    a = align_blocks(*args, stats=one)
    b = align_blocks_parallel(*args, stats=two, workers=2)
    for name in ("counts", "ids", "logprobs", "tail"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert one == two


def test_vocab_map_cache(shared, tmp_path, monkeypatch):
    import fusion.align.vocab as vocab

    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    (_, t_view), (_, s_view) = load(shared, "mistral-7b-v0.1"), load(shared, "gpt2")
    first = vocab_map(s_view, t_view, "reference-hard")
    files = list((tmp_path / "vocab").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # written whole under its final name, no temporary left
    monkeypatch.setattr(vocab, "hard_map", lambda *_: pytest.fail("rebuilt instead of read from the cache"))
    vocab._memory.clear()  # as in a fresh process
    assert np.array_equal(vocab_map(s_view, t_view, "reference-hard"), first)
    files[0].write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    vocab._memory.clear()
    assert np.array_equal(vocab_map(s_view, t_view, "reference-hard"), first)
    with pytest.raises(FusionError, match="mode 'fuzzy'"):
        vocab_map(s_view, t_view, "fuzzy")


def test_default_map_rules(shared):
    (_, llama), (_, gpt2), (_, neox) = load(shared, "llama2"), load(shared, "gpt2"), load(shared, "gpt-neox-20b")
    to_llama = vocab_map(gpt2, llama, "default")
    def name(view, table, s):
        return view.strings[table[gpt2.vocab[s]]] if table[gpt2.vocab[s]] >= 0 else None
    assert name(llama, to_llama, "Ġworld") == "▁world"  # same bytes
    assert name(llama, to_llama, "Ġ1999") == "▁"  # longest target prefix: Llama splits digits
    assert name(llama, to_llama, "Ċ") == "<0x0A>"  # a byte Llama has no ordinary token for
    assert name(llama, to_llama, "Ã") is None  # first byte of a character Llama has tokens for: unknowable
    assert to_llama[gpt2.eos_id] == llama.eos_id
    from_llama = vocab_map(llama, neox, "default")
    assert neox.strings[from_llama[llama.vocab["▁▁▁"]]] == "   "  # NeoX's added token wins over "ĠĠĠ"
    assert from_llama[llama.bos_id] == neox.bos_id and from_llama[llama.eos_id] == neox.eos_id


def test_a_normalizing_tokenizer_on_unnormalized_text_is_aligned_through_its_normalizer(shared):
    """GPT-NeoX applies NFC: tokens of a decomposed "é" spell the composed one, not the text. They
    are placed through the tokenizer's own normalization; tokens of another text are still refused."""
    (t_tok, t_view), (s_tok, s_view) = load(shared, "gpt2"), load(shared, "gpt-neox-20b")
    text = "cafe\u0301 and the tea"
    t = t_tok.encode(text, add_special_tokens=False)
    s = s_tok.encode(text, add_special_tokens=False)
    ids = np.array([[x] for x in s])  # a perfect teacher: row i is source token i
    stats = {}
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, np.zeros((len(s), 1)), np.zeros(len(s)), t_view,
                        s_view, None, "default", stats)
    got = [t_view.strings[rows.ids[rows.ptr[j]]] if rows.counts[j] else None for j in range(rows.rows)]
    assert [t_view.strings[x] for x in t][-3:] == ["Ġand", "Ġthe", "Ġtea"]
    assert got[-3:] == ["Ġand", "Ġthe", "Ġtea"]  # after the normalized character the boundaries agree again
    other = s_tok.encode("cafe and the tea", add_special_tokens=False)
    with pytest.raises(FusionError, match=r"block 0, source tokens \(gpt-neox-20b\).*as the tokenizer normalizes it"):
        align_blocks([text], t, [0, len(t)], other, [0, len(other)], np.zeros((len(other), 1), np.int64),
                     np.zeros((len(other), 1)), np.zeros(len(other)), t_view, s_view)


@pytest.mark.parametrize("pair, corpus", [(("stories260K", "gpt2"), "corpus-sotu-en/sotu.txt"),
                                          (("gpt2", "gpt-neox-20b"), "code"), (("gpt2", "qwen3"), "deep")])
def test_continuation_rows_follow_the_whole_distribution(shared, pair, corpus):
    """Boundaries inside a source token, taught from continuation rows that the capture computed
    from the whole distribution: the same rows as the plain rule over every source token, and
    every such row covered."""
    import torch

    from fusion import scoring, tiny
    from fusion.align.vocab import first_token
    from fusion.continuations import OnDevice, continuation_rows, prefix_ranges
    from fusion.sparse import SparseRows

    (t_tok, t_view), (s_tok, s_view) = load(shared, pair[0]), load(shared, pair[1])
    if corpus == "code":
        text = next(t for t, domain in tiny.corpus_documents("python-stdlib") if domain == "code" and "        " in t)
        text = text[text.index("        ") - 200 :][:600]
    elif corpus == "deep":  # runs of spaces longer than the deepest continuation row
        text = "def f(x):\n" + "".join(" " * n + f"y{n} = x  # {' ' * n}note\n" for n in (4, 20, 28, 40))
    else:
        text = (shared / "assets" / corpus).read_text()[20000:20600]
    t = np.array(t_tok.encode(text, add_special_tokens=False))
    s = np.array(s_tok.encode(text, add_special_tokens=False))
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(size=(len(s), s_view.size)) * 2.5, dtype=torch.float32)
    m = 3
    ids, logprobs, tail, _ = (x.numpy() for x in scoring.top_k_rows(logits, torch.tensor(s), 6))
    depth, c_ids, c_lp, c_tail = (x.numpy() for x in continuation_rows(logits, torch.tensor(s),
                                                                       OnDevice(prefix_ranges(s_view), "cpu"), m))
    listed = c_ids >= 0
    cont = SparseRows(listed.sum(1), c_ids[listed], c_lp[listed].astype(np.float32), c_tail.astype(np.float32))
    stats = {}
    rows = align_blocks([text], t, [0, len(t)], s, [0, len(s)], ids, logprobs.astype(np.float32),
                        tail.astype(np.float32), t_view, s_view, None, "default", stats, (depth, cont))
    vocab_bytes = [s_view.token_bytes(x) if not s_view.special[x] else b"" for x in range(s_view.size)]
    expected = default_rows(text.encode(), [t_view.token_bytes(x) for x in t], [s_view.token_bytes(x) for x in s],
                            ids, logprobs.astype(np.float64), tail.astype(np.float64), vocab_bytes,
                            vocab_map(s_view, t_view, "default"), first_token(t_view),
                            full=torch.softmax(logits, -1).double().numpy(), m=m)
    for j, (probs, rest) in enumerate(expected):
        a, b = rows.ptr[j], rows.ptr[j + 1]
        got = dict(zip(rows.ids[a:b].tolist(), np.exp(rows.logprobs[a:b].astype(np.float64))))
        assert got.keys() == probs.keys(), j
        assert np.allclose([got[y] for y in probs], list(probs.values()), rtol=1e-2), j  # float16 log-probs
        assert np.isclose(rows.tail[j], rest, rtol=1e-2, atol=2e-3), j
    assert stats["continued"] > 10 and stats["conditioned"] == 0
    assert stats["coverage"] == 1.0
    if corpus == "deep":
        assert depth.max() == 16 and any(len(s_view.token_bytes(x)) > 17 for x in s)
