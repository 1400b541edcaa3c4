"""What every token id of a tokenizer stands for, read from the tokenizer's own data.

Alignment compares tokenizers through the bytes of text their tokens stand for. Those bytes are
derived here from the tokenizer's pipeline description (its decoder, pre-tokenizer, normalizer,
model and added tokens), never from its class name:

- a ByteLevel decoder or pre-tokenizer: token strings are spelled in the ByteLevel alphabet
  (printable bytes as themselves, the others shifted to U+0100..), so each character is one byte;
- Replace / Metaspace decoders (SentencePiece-style): the replaced piece (e.g. "▁") is a space;
- ByteFallback: pieces "<0xNN>" stand for the single byte NN (also where a tokenizer lists them as
  special added tokens: the model emits them for bytes it has no piece for);
- added tokens that are not special stand for their literal content;
- special tokens (BOS, EOS, pad, unk, ...) stand for no text at all (`special` is True).

Decoder steps that only act on the joined text (Strip, Fuse) are left out: the leading space a
SentencePiece tokenizer adds in front of a text ("dummy prefix") stays in the first token's bytes,
and the aligner accounts for it per block by comparing the tokens with the text.

The `marker` (the character that spells a space inside token strings: "▁", "Ġ" or "") and the
token strings themselves are what the reference (paper) mode works on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# Bump when the derivation changes, so that cached vocabulary maps built from older views are not reused.
VIEW_VERSION = "1"

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's spelling of bytes: character -> byte. Printable bytes spell
    themselves; the other 68 take the characters U+0100.. in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(0x100 + shifted)] = b
            shifted += 1
    return alphabet


@dataclass
class TokenView:
    """Per-id facts about one tokenizer. Token id i stands for the bytes data[ptr[i]:ptr[i+1]]."""

    strings: list[str]  # the token's string as the tokenizer spells it (convert_ids_to_tokens); "" if unused
    marker: str  # character that spells a space inside token strings ("▁", "Ġ"), or ""
    byte_level: bool  # strings spelled in the ByteLevel alphabet
    data: np.ndarray  # uint8: the bytes of all tokens back to back
    ptr: np.ndarray  # int64 [V+1]
    special: np.ndarray  # bool [V]: control tokens that stand for no text
    byte_piece: np.ndarray  # bool [V]: byte-fallback pieces "<0xNN>"
    added: np.ndarray  # bool [V]: added (non-model) tokens that stand for their literal content
    bos_id: int  # -1 where the tokenizer has none
    eos_id: int
    unk_id: int
    hash: str  # hash of everything above (so cached tables follow any change in the derivation)
    name: str = ""
    # text -> the bytes its tokens spell, by the tokenizer's own normalizer (None: no normalizer);
    # streams.locate uses it where the tokens do not spell the text itself
    normalized: Callable[[str], bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.strings)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    def token_bytes(self, i: int) -> bytes:
        return self.data[self.ptr[i] : self.ptr[i + 1]].tobytes()

    def stream(self, ids) -> bytes:
        """The bytes a sequence of ids stands for."""
        return b"".join(self.token_bytes(int(i)) for i in ids)

    @cached_property
    def vocab(self) -> dict[str, int]:
        """token string -> id, a later id winning over an earlier one with the same string (as a
        slow tokenizer's get_vocab() does)."""
        return {s: i for i, s in enumerate(self.strings) if s}

    @cached_property
    def stripped_codepoints(self) -> tuple[np.ndarray, np.ndarray]:
        """Token strings with the marker deleted, as code points (what the paper's DTW compares)."""
        return codepoints([s.replace(self.marker, "") if self.marker else s for s in self.strings])

    @cached_property
    def canonical(self) -> np.ndarray:
        """int32 [V]: the id vocab[] gives for this id's string (ids whose strings collide share one)."""
        vocab = self.vocab
        return np.array([vocab.get(s, i) for i, s in enumerate(self.strings)], dtype=np.int32)


def codepoints(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one int32 array of code points plus an int64 [n+1] pointer."""
    ptr = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in strings], out=ptr[1:])
    flat = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32).astype(np.int32)
    return flat, ptr


def _steps(component: dict | None) -> list[dict]:
    """A pipeline component (decoder, pre-tokenizer, normalizer) as a flat list of steps."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("decoders") or component.get("pretokenizers") or component.get("normalizers") or []
        return [s for c in inner for s in _steps(c)]
    return [component]


def _pattern(step: dict) -> str | None:
    pattern = step.get("pattern")
    return pattern.get("String") if isinstance(pattern, dict) else pattern


def _spelling(config: dict) -> tuple[bool, list[tuple[str, str]], bool, str]:
    """How token strings spell text: (byte_level, replacements, byte_fallback, suffix_to_strip)."""
    byte_level, replacements, suffix = False, [], ""
    byte_fallback = bool((config.get("model") or {}).get("byte_fallback"))
    decoder = _steps(config.get("decoder"))
    for step in decoder:
        kind = step.get("type")
        if kind == "ByteLevel":
            byte_level = True
        elif kind == "Replace" and _pattern(step) is not None:
            replacements.append((_pattern(step), step.get("content", "")))
        elif kind == "Metaspace":
            replacements.append((step.get("replacement", "▁"), " "))
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "WordPiece":
            replacements.append((step.get("prefix", "##"), ""))
        elif kind == "BPEDecoder":
            suffix = step.get("suffix", "")
    if not decoder:  # no decoder: infer the spelling from how text is turned into pieces
        for step in _steps(config.get("pre_tokenizer")):
            if step.get("type") == "ByteLevel":
                byte_level = True
            elif step.get("type") == "Metaspace":
                replacements.append((step.get("replacement", "▁"), " "))
        for step in _steps(config.get("normalizer")):
            if step.get("type") == "Replace" and _pattern(step) == " ":
                replacements.append((step.get("content", ""), " "))
    return byte_level, replacements, byte_fallback, suffix


def build_view(
    strings: list[str],
    config: dict,
    special_ids: set[int],
    added_literal_ids: set[int],
    bos_id: int = -1,
    eos_id: int = -1,
    unk_id: int = -1,
    hash: str = "",
    name: str = "",
) -> TokenView:
    """A TokenView from token strings and a tokenizer.json-style description of the pipeline
    (only "decoder", "pre_tokenizer", "normalizer" and "model.byte_fallback" are read)."""
    byte_level, replacements, byte_fallback, suffix = _spelling(config)
    alphabet = byte_level_alphabet() if byte_level else {}
    marker = next((c for c, b in alphabet.items() if b == 0x20), "")
    if not marker:
        marker = next((pattern for pattern, content in replacements if content == " " and pattern), "")

    n = len(strings)
    pieces: list[bytes] = []
    special = np.zeros(n, dtype=bool)
    byte_piece = np.zeros(n, dtype=bool)
    added = np.zeros(n, dtype=bool)
    for i, s in enumerate(strings):
        if byte_fallback and (m := BYTE_PIECE.fullmatch(s)):  # what the model emits for a byte, even if
            byte_piece[i] = True  # the tokenizer also lists the piece as a special added token
            pieces.append(bytes([int(m.group(1), 16)]))
        elif i in special_ids or not s:
            special[i] = i in special_ids
            pieces.append(b"")
        elif i in added_literal_ids:
            added[i] = True
            pieces.append(s.encode("utf-8"))
        elif byte_level:
            pieces.append(bytes(alphabet[c] for c in s) if all(c in alphabet for c in s) else s.encode("utf-8"))
        else:
            text = s
            if suffix and text.endswith(suffix):
                text = text[: -len(suffix)] + " "
            for pattern, content in replacements:
                text = text.replace(pattern, content)
            pieces.append(text.encode("utf-8"))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=ptr[1:])
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()
    digest = hashlib.sha256(f"{VIEW_VERSION}:{hash}:{marker}:{byte_level}".encode())
    for part in (data, ptr, special, byte_piece, added, np.array([bos_id, eos_id, unk_id])):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update("\0".join(strings).encode("utf-8", "surrogatepass"))
    view_hash = digest.hexdigest()[:32]
    return TokenView(strings, marker, byte_level, data, ptr, special, byte_piece, added,
                     bos_id, eos_id, unk_id, view_hash, name)


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    if backend is None:
        from ..errors import FusionError

        raise FusionError(
            f"tokenizer {type(tokenizer).__name__}: not a Hugging Face fast tokenizer (no backend_tokenizer); "
            "load it with transformers.PreTrainedTokenizerFast(tokenizer_file=...) or AutoTokenizer(use_fast=True)"
        )
    return backend


def _role_id(tokenizer, role: str) -> int:
    value = getattr(tokenizer, f"{role}_token_id", None)
    return int(value) if isinstance(value, int) else -1


def content_hash(tokenizer) -> str:
    """Hash of everything that decides what the tokenizer's ids stand for (for cache keys)."""
    h = hashlib.sha256(_backend(tokenizer).to_str().encode())
    for role in ("bos", "eos", "unk", "pad"):
        h.update(f"{role}={_role_id(tokenizer, role)};".encode())
    return h.hexdigest()[:32]


def token_view(tokenizer, name: str = "") -> TokenView:
    """The TokenView of a Hugging Face fast tokenizer (PreTrainedTokenizerFast, AutoTokenizer with
    a tokenizer.json, or a bare `tokenizers.Tokenizer`)."""
    backend = _backend(tokenizer)
    config = json.loads(backend.to_str())
    size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    strings = [backend.id_to_token(i) or "" for i in range(size)]
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    literal = set()
    for entry in config.get("added_tokens") or []:
        (special if entry.get("special") else literal).add(int(entry["id"]))
    roles = {role: _role_id(tokenizer, role) for role in ("bos", "eos", "unk")}
    if roles["bos"] < 0:  # no wrapper config: the BOS is the special token the template puts first
        first = ((config.get("post_processor") or {}).get("single") or [{}])[0].get("SpecialToken")
        if first and backend.token_to_id(first["id"]) is not None:
            roles["bos"] = backend.token_to_id(first["id"])
    unk = (config.get("model") or {}).get("unk_token")
    if roles["unk"] < 0 and unk is not None and backend.token_to_id(unk) is not None:
        roles["unk"] = backend.token_to_id(unk)
    if roles["unk"] >= 0:
        special.add(roles["unk"])
    view = build_view(strings, config, special, literal - special, roles["bos"], roles["eos"], roles["unk"],
                      hash=content_hash(tokenizer), name=name)
    view.normalized = normalization(backend.normalizer, _spelling(config)[1])
    return view


def normalization(normalizer, replacements: list[tuple[str, str]]) -> Callable[[str], bytes] | None:
    """What the tokens of a text spell: the text through the tokenizer's normalizer (a
    `tokenizers` Normalizer), spaces spelled back from their marker as the token views do."""
    if normalizer is None:
        return None
    spaces = [(pattern, content) for pattern, content in replacements if content == " " and pattern]

    def spell(text: str) -> bytes:
        out = normalizer.normalize_str(text)
        for pattern, content in spaces:
            out = out.replace(pattern, content)
        return out.encode("utf-8", "surrogateescape")

    return spell
