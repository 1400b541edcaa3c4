"""Tokenizers that normalize the text (stories260K's strips leading and trailing spaces and
collapses runs of spaces; GPT-NeoX's and Qwen's apply NFC): alignment goes through each
tokenizer's own normalization, checked independently of the byte alignment it uses; a
tokenizer whose tokens cannot be placed on the text at all is refused before any work."""

import re

import numpy as np
import pytest

from fusion.align import align_blocks, check_placeable, token_view
from fusion.align.streams import locate
from fusion.errors import FusionError

_loaded = {}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusion-cache"))


def load(shared, name):
    if name not in _loaded:
        from transformers import AutoTokenizer

        path = shared / "assets" / ("model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}")
        tok = AutoTokenizer.from_pretrained(path)
        _loaded[name] = (tok, token_view(tok, name))
    return _loaded[name]


def squeeze(data: bytes) -> bytes:
    """Bytes with runs of spaces as one space and no space at either end: what collapsing and
    stripping normalizers leave the same."""
    return re.sub(rb" +", b" ", data).strip(b" ")


def corpus_texts(shared):
    """Excerpts of both shared corpora, made harder: runs of spaces, leading and trailing ones."""
    sotu = (shared / "assets" / "corpus-sotu-en" / "sotu.txt").read_text()
    docs = (shared / "assets" / "corpus-python311-docs-en" / "python311_docs.txt").read_text()
    at = docs.index("\n    ", 20000)  # an indented code example
    texts = [sotu[30000:31500], "  " + sotu[60000:61000].replace(". ", ".   ") + "   ", docs[at - 600 : at + 900]]
    assert all("  " in t for t in texts[1:])
    return texts


def test_stories260k_spans_are_the_text_it_normalized(shared):
    """Independent check of the spans: before every token, the text and the tokens before it say
    the same up to runs of spaces; an exact token's span is byte for byte its own spelling; the
    spans cover the text."""
    tok, view = load(shared, "stories260K")
    for n, text in enumerate(corpus_texts(shared)):
        raw = text.encode()
        ids = np.array(tok.encode(text, add_special_tokens=False))
        assert (view.stream(ids) == b" " + raw) == (n == 0)  # the tokenizer normalized the harder ones
        starts, lengths, exact = locate(view, ids, raw, "test")
        assert starts[0] in (-1, 0) and starts[-1] + lengths[-1] == len(raw)
        assert (starts[1:] == starts[:-1] + lengths[:-1]).all()
        before = b""
        for q, x in enumerate(ids):
            assert squeeze(raw[: max(starts[q], 0)]) == squeeze(before), q
            if exact[q]:
                own = view.token_bytes(x)
                assert raw[max(starts[q], 0) : starts[q] + lengths[q]] == (own[1:] if starts[q] < 0 else own)
            before += view.token_bytes(x)
        assert exact.mean() > 0.9


def perfect_teacher(s, view, rng, k=4):
    """Row i: the real source token i with probability 0.7, random others sharing 0.2, tail 0.1."""
    ids = rng.integers(3, view.size, (len(s), k))
    ids[:, 0] = s
    probs = np.array([0.7] + [0.2 / (k - 1)] * (k - 1))
    return ids, np.log(np.tile(probs, (len(s), 1))), np.full(len(s), 0.1)


@pytest.mark.parametrize("other", ["gpt2", "llama2", "qwen3"])
@pytest.mark.parametrize("stories_is", ["source", "target"])
def test_stories260k_aligns_as_source_and_as_target(shared, other, stories_is):
    """On both shared corpora, against a byte-level and a SentencePiece tokenizer: every block
    aligns, and with a teacher that knows the text, the most probable target token of every row
    that got a distribution is what the text says next (up to runs of spaces)."""
    stories, partner = load(shared, "stories260K"), load(shared, other)
    (t_tok, t_view), (s_tok, s_view) = (partner, stories) if stories_is == "source" else (stories, partner)
    texts = corpus_texts(shared)
    t = [t_tok.encode(x, add_special_tokens=False) for x in texts]
    s = [s_tok.encode(x, add_special_tokens=False) for x in texts]
    s_flat = np.concatenate(s)
    ids, logprobs, tail = perfect_teacher(s_flat, s_view, np.random.default_rng(0))
    stats = {}
    rows = align_blocks(texts, np.concatenate(t), np.cumsum([0] + [len(x) for x in t]), s_flat,
                        np.cumsum([0] + [len(x) for x in s]), ids, logprobs, tail, t_view, s_view, None, "default",
                        stats)
    assert stats["coverage"] > 0.85, stats
    row = 0
    for text, block in zip(texts, t):
        raw = text.encode()
        starts, _, _ = locate(t_view, np.array(block), raw, "target")
        for j in range(len(block)):
            a, b = rows.ptr[row], rows.ptr[row + 1]
            if b > a:
                said = t_view.token_bytes(rows.ids[a])
                ahead = raw[max(starts[j], 0):] if starts[j] >= 0 else b" " + raw
                assert squeeze(ahead).startswith(squeeze(said)) or not squeeze(said), (j, said, ahead[:20])
            row += 1


def unplaceable_tokenizer():
    """A WordPiece tokenizer (BERT-style): its pieces lose the spaces between words, so its
    tokens spell neither the text nor its normalization."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[CLS]")


def test_a_tokenizer_that_cannot_be_placed_is_refused(shared):
    tok = unplaceable_tokenizer()
    with pytest.raises(FusionError) as refused:
        check_placeable(tok, token_view(tok, "bert-like"), "bert-like")
    assert re.fullmatch(r"model 'bert-like': its tokens of the probe text 'The quick brown fox.*' spell '.+', not the "
                        r"text: this tokenizer cannot be aligned \(it drops or changes characters\)", str(refused.value))
    for name in ("stories260K", "gpt-neox-20b", "qwen3", "llama2"):
        tok, view = load(shared, name)
        check_placeable(tok, view, name)


def test_validate_refuses_it_naming_the_model(tmp_path, micro, capsys):
    """`fusion validate` (and so every run, before the logits stage) stops with one line."""
    import shutil

    import yaml

    from fusion.cli import main
    from fusion.errors import BAD_INPUT_EXIT_CODE

    model = tmp_path / "bert-like"
    shutil.copytree(micro.models["src-llama"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (model / name).unlink(missing_ok=True)
    unplaceable_tokenizer().save_pretrained(model)
    spec = micro.spec(tmp_path / "store", **{"models.sources": [{"name": "bert-like", "path": str(model)}]})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code = main(["validate", str(tmp_path / "spec.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == BAD_INPUT_EXIT_CODE and "\n" not in err, err
    assert "model 'bert-like': its tokens of the probe text" in err and "cannot be aligned" in err, err
    assert "block" not in err, err  # a preflight refusal, not a block of the corpus
    assert not (tmp_path / "store").exists()
