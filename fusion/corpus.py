"""Reading a corpus as documents, and cutting text into blocks that fit every tokenizer.

`read_documents` gives (text, domain) pairs in a fixed order. Accepted: .jsonl, .txt, .parquet
files; folders of them (sorted by path); saved Hugging Face datasets (a folder written by
`Dataset.save_to_disk`); and `tiny:python-stdlib`, the docstrings and code of this Python
installation's standard library.

`split_text` cuts a text into pieces that each tokenizer turns into at most a given number of
tokens, ending at a line break or a space where one is near: the split stage's blocks, and the
blocks that `fusion ensemble` and `fusion moe` score.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fusion.config import CorpusSpec
from fusion.errors import FusionError
from fusion.models import encode

SUFFIXES = (".jsonl", ".txt", ".parquet")
FILL = 0.9  # first guess of a block's share of its token budget, leaving room for boundary effects


def read_documents(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    docs = _documents(spec)
    for n, doc in enumerate(docs):
        if spec.max_documents is not None and n >= spec.max_documents:
            return
        yield doc


def _documents(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    if spec.path.startswith("tiny:"):
        from fusion import tiny

        yield from tiny.corpus_documents(spec.path.removeprefix("tiny:"))
        return
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise FusionError(f"corpus.path: {spec.path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        yield from _hf_dataset(path, spec)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise FusionError(f"corpus.path: {spec.path} holds no {', '.join(SUFFIXES)} files")
        for f in files:
            yield from _file(f, spec)
    else:
        yield from _file(path, spec)


def _file(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        yield from _jsonl(path, spec)
    elif path.suffix == ".txt":
        yield _decode(path.read_bytes(), str(path)), path.stem
    elif path.suffix == ".parquet":
        yield from _parquet(path, spec)
    else:
        raise FusionError(f"corpus.path: {path} is not .jsonl, .txt or .parquet")


def _decode(blob: bytes, where: str) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FusionError(f"{where}: not UTF-8 text (byte 0x{blob[e.start]:02x} at offset {e.start})") from None


def _pick(record: dict, spec: CorpusSpec, where: str, default_domain: str) -> tuple[str, str]:
    text = record.get(spec.text_field)
    if not isinstance(text, str):
        raise FusionError(f"{where}: no string field '{spec.text_field}' (corpus.text_field)")
    domain = default_domain
    if spec.domain_field is not None:
        domain = str(record.get(spec.domain_field, default_domain))
    return text, domain


def _jsonl(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(_decode(line, where))
            except json.JSONDecodeError as e:
                raise FusionError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise FusionError(f"{where}: expected a JSON object per line")
            yield _pick(record, spec, where, path.stem)


def _parquet(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    columns = [spec.text_field] + ([spec.domain_field] if spec.domain_field else [])
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:
        raise FusionError(f"{path}: cannot read columns {columns} ({e})") from None
    for i, record in enumerate(table.to_pylist()):
        yield _pick(record, spec, f"{path} row {i}", path.stem)


def _hf_dataset(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise FusionError(f"{path}: dataset has splits {list(ds)} but no 'train'")
        ds = ds["train"]
    for i, record in enumerate(ds):
        yield _pick(record, spec, f"{path} row {i}", path.name)


# ---- cutting text into blocks ------------------------------------------------------------------
def split_text(text: str, tokenizers: list, max_tokens: int) -> list[str]:
    """Cut text into pieces that each tokenizer turns into at most max_tokens tokens."""
    if not text.strip():
        return []
    cuts = _first_cuts(text, tokenizers, max_tokens)
    pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    out = []
    for piece, bad in zip(pieces, _too_long(pieces, tokenizers, max_tokens)):
        out.extend(_halve_until_fit(piece, tokenizers, max_tokens) if bad else [piece])
    return out


def _halve_until_fit(piece: str, tokenizers: list, max_tokens: int) -> list[str]:
    if not _too_long([piece], tokenizers, max_tokens)[0]:
        return [piece]
    if len(piece) == 1:
        raise FusionError(f"the single character {piece!r} is more than split.block_tokens={max_tokens} tokens")
    mid = _snap(piece, len(piece) // 2)
    return _halve_until_fit(piece[:mid], tokenizers, max_tokens) + _halve_until_fit(piece[mid:], tokenizers, max_tokens)


def _first_cuts(text: str, tokenizers: list, max_tokens: int) -> list[int]:
    """Cut points from each tokenizer's offsets: the longest stretch within FILL * max_tokens
    tokens for every tokenizer, moved back to a line break or space."""
    ends = []
    for tok in tokenizers:
        offsets = encode(tok, [text], offsets=True)["offset_mapping"][0]
        e = np.maximum.accumulate(np.array([b for _, b in offsets] or [len(text)], dtype=np.int64))
        ends.append(e)
    budget = max(1, int(max_tokens * FILL))
    cuts, start = [0], 0
    while start < len(text):
        stop = len(text)
        for e in ends:
            first = int(np.searchsorted(e, start, side="right"))
            if first + budget < len(e):
                stop = min(stop, int(e[first + budget - 1]))
        if stop < len(text):
            stop = _snap(text[start:stop], stop - start) + start
        stop = max(stop, start + 1)
        cuts.append(stop)
        start = stop
    return cuts


def _snap(piece: str, at: int) -> int:
    """A cut position at or before `at`, moved back to just after a newline or a space if one
    lies in the second half."""
    for sep in ("\n", " "):
        pos = piece.rfind(sep, 0, at)
        if pos >= at // 2:
            return pos + 1
    return max(1, at)


def _too_long(pieces: list[str], tokenizers: list, max_tokens: int) -> list[bool]:
    bad = [False] * len(pieces)
    for tok in tokenizers:
        for i, ids in enumerate(encode(tok, pieces)):
            bad[i] = bad[i] or len(ids) > max_tokens
    return bad
