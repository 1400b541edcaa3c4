"""Token views: the bytes every id stands for, from real tokenizers and from tokenizers trained here."""

import inspect
import json
import os

import numpy as np
import pytest

from fusion.align.streams import place
from fusion.align.tokens import byte_level_alphabet, content_hash, token_view
from fusion.errors import FusionError

REAL = ["llama2", "mistral-7b-v0.1", "gpt-neox-20b", "gpt2", "openllama-v1"]
TEXTS = [
    "Hello world, this is FuseLLM: knowledge fusion of LLMs.",
    "naïve café — 你好 🦙 x² ½",
    "def f(x):\n\treturn x  *  2\n\n\n    # four spaces\r\n",
    " leading space and trailing space ",
    "   three leading spaces",
    "digits 1234567890 3.14159 2023-11-23",
    "<s> looks special but is text </s> <|endoftext|>",
    "",
    " ",
    "\n",
]


def real(shared, name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "assets" / f"tok-{name}")


def corpus() -> list[str]:
    """Training text read from the Python installation."""
    import collections
    import json as json_module
    import string

    return [inspect.getsource(m) for m in (collections, json_module, string, os.path)]


def sentencepiece_style():
    """Metaspace + BPE with byte fallback, byte pieces in the model's vocabulary (as converted
    SentencePiece models have them); a tiny alphabet so that byte fallback is used a lot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                          limit_alphabet=40, show_progress=False))
    config = json.loads(tok.to_str())
    vocab = config["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(config))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def byte_level(add_prefix_space=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def unknown_without_fallback():
    """A word-level vocabulary without byte fallback: characters it lacks become <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], limit_alphabet=30,
                                                          show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


TRAINED = {"sentencepiece-style": sentencepiece_style, "byte-level": byte_level,
           "byte-level-prefix-space": lambda: byte_level(True)}


def assert_spells_every_text(tok, view):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        prefix, lengths = place(view, np.array(ids), text.encode(), "test")
        assert prefix in (0, 1)
        if not any(view.special[i] for i in ids):
            assert int(lengths.sum()) == len(text.encode()) + prefix
            assert view.stream(ids) == b" " * prefix + text.encode()


@pytest.mark.parametrize("name", REAL)
def test_real_tokenizers_spell_the_text(shared, name):
    tok = real(shared, name)
    assert_spells_every_text(tok, token_view(tok, name))


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_tokenizers_spell_the_text(name):
    tok = TRAINED[name]()
    view = token_view(tok)
    assert_spells_every_text(tok, view)
    assert view.marker == ("Ġ" if name.startswith("byte-level") else "▁")


def test_sentencepiece_style_uses_byte_pieces():
    tok = sentencepiece_style()
    view = token_view(tok)
    ids = tok.encode("你好 🦙", add_special_tokens=False)
    assert any(view.byte_piece[i] for i in ids)
    assert view.token_bytes(tok.convert_tokens_to_ids("<0x0A>")) == b"\n"
    eos = tok.convert_tokens_to_ids("</s>")
    assert view.special[eos] and view.token_bytes(eos) == b""


def test_byte_pieces_listed_as_special_tokens_still_stand_for_bytes():
    """Some tokenizers list their <0xNN> pieces as special added tokens; the model still emits
    them for bytes it has no piece for."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    specials = ["<unk>", "<s>", "</s>"] + pieces
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials, limit_alphabet=40,
                                                          show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    view = token_view(tok)
    piece = tok.convert_tokens_to_ids("<0x7E>")
    assert piece in tok.all_special_ids or any(a["content"] == "<0x7E>" and a["special"]
                                               for a in json.loads(tok.backend_tokenizer.to_str())["added_tokens"])
    assert view.token_bytes(piece) == b"~" and view.byte_piece[piece] and not view.special[piece]
    assert_spells_every_text(tok, view)


def test_unknown_tokens_cover_the_text_between_their_neighbours():
    tok = unknown_without_fallback()
    view = token_view(tok)
    text = "the café serves 你好"
    ids = np.array(tok.encode(text, add_special_tokens=False))
    assert view.unk_id in ids
    prefix, lengths = place(view, ids, text.encode(), "test")
    assert int(lengths.sum()) == len(text.encode()) + prefix
    with pytest.raises(FusionError, match="block 7"):
        place(view, ids, "the cafe serves".encode(), "block 7")


def test_real_views_in_detail(shared):
    llama, gpt2, neox = (token_view(real(shared, n), n) for n in ("llama2", "gpt2", "gpt-neox-20b"))
    assert (llama.marker, gpt2.marker, neox.marker) == ("▁", "Ġ", "Ġ")
    assert llama.token_bytes(llama.vocab["▁Hello"]) == b" Hello"
    assert llama.token_bytes(llama.vocab["<0x0A>"]) == b"\n" and llama.byte_piece[llama.vocab["<0x0A>"]]
    assert llama.special[llama.bos_id] and llama.token_bytes(llama.bos_id) == b"" and llama.eos_id == 2
    assert gpt2.token_bytes(gpt2.vocab["Ġworld"]) == b" world" and gpt2.token_bytes(gpt2.vocab["Ċ"]) == b"\n"
    assert gpt2.token_bytes(gpt2.vocab["Ã©"]) == "é".encode()
    assert gpt2.eos_id == 50256 and gpt2.special[50256]
    three = neox.vocab["   "]
    assert neox.added[three] and neox.token_bytes(three) == b"   "


def test_byte_level_alphabet_is_the_tokenizers_one():
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256)) and alphabet["Ġ"] == 0x20 and alphabet["Ċ"] == 0x0A


def test_content_hash(shared):
    a, b, c = real(shared, "llama2"), real(shared, "llama2"), real(shared, "mistral-7b-v0.1")
    assert content_hash(a) == content_hash(b) != content_hash(c)
    assert token_view(a).hash == token_view(b).hash != token_view(c).hash


def test_not_a_fast_tokenizer():
    with pytest.raises(FusionError, match="not a Hugging Face fast tokenizer"):
        token_view(object())
