"""Our reference mode on a folder in the alignment-fixture format (../shared/reference/alignment-fixture).

The folder holds inputs.npz (per sequence KK: base_ids_KK, blend_ids_KK, topk_idx_KK,
topk_logits_KK, the blending model's prediction after each of its tokens), base_vocab.json /
blend_vocab.json (token string per id), vocab_mapping_default.json (the soft map, blending string
with its marker spelled as the base's -> base string), meta.json (markers, sequence count) and
tokenizers/ (base_*.model a SentencePiece model, blend_*.tokenizer.json a Hugging Face one).
Base = target, blending = source. The candidate .npz holds row_ptr_KK, idx_KK, val_KK (and
kind_KK) in the paper's row convention, the values being the raw logits as given.

    python -m fusion.align.fixture --fixture DIR --mode reference-hard|reference-soft --out FILE.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import FusionError
from .dtw import diagonal_columns, text_columns
from .modes import SOFT, Mode, resolve_reference
from .reference import align_reference, first_token_match
from .streams import gather_bytes
from .tokens import TokenView, build_view, codepoints, token_view

# SentencePiece piece types (sentencepiece_model.proto)
UNKNOWN, CONTROL, BYTE = 2, 3, 6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes):
    """(field number, value) pairs of one protobuf message, values left undecoded."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
        yield key >> 3, value


def sentencepiece_view(model_path: Path, name: str = "") -> TokenView:
    """A TokenView from a SentencePiece model file (pieces and their types, read from the proto).
    SentencePiece spells a space as U+2581 and byte pieces as <0xNN>."""
    raw = model_path.read_bytes()
    pieces = []
    for number, value in _fields(raw):
        if number == 1:  # ModelProto.pieces: {1: piece, 2: score, 3: type}
            piece = dict(_fields(value))
            pieces.append((piece[1].decode("utf-8"), piece.get(3, 1)))
    strings = [p for p, _ in pieces]
    special = {i for i, (_, kind) in enumerate(pieces) if kind in (UNKNOWN, CONTROL)}
    decoder = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    if any(kind == BYTE for _, kind in pieces):
        decoder.append({"type": "ByteFallback"})
    role = {s: i for i, s in enumerate(strings) if i in special}
    return build_view(strings, {"decoder": {"type": "Sequence", "decoders": decoder}}, special, set(),
                      bos_id=role.get("<s>", -1), eos_id=role.get("</s>", -1), unk_id=role.get("<unk>", -1),
                      hash=hashlib.sha256(raw).hexdigest()[:32], name=name)


def _view(folder: Path, side: str) -> TokenView:
    for path in sorted(folder.glob(f"{side}*")):
        if path.name.endswith(".json"):
            from tokenizers import Tokenizer

            return token_view(Tokenizer.from_file(str(path)), name=side)
        if path.name.endswith(".model"):
            return sentencepiece_view(path, name=side)
    raise FusionError(f"{folder}: no tokenizer file for the {side} side "
                      f"(expected {side}_*.model or {side}_*.tokenizer.json)")


def _columns(base: TokenView, blend: TokenView, base_ids: np.ndarray, blend_ids: np.ndarray):
    """The band's centre: target columns of each source token's first and last byte, from the
    bytes both sequences stand for (a straight diagonal where they spell different texts)."""
    b_stream = gather_bytes(base.data, base.ptr, base_ids).tobytes()
    a_stream = gather_bytes(blend.data, blend.ptr, blend_ids).tobytes()
    if a_stream == b_stream:
        a_shift = b_shift = 0
    elif b_stream == b" " + a_stream:
        a_shift, b_shift = 0, 1
    elif a_stream == b" " + b_stream:
        a_shift, b_shift = 1, 0
    else:
        return diagonal_columns(len(blend_ids), len(base_ids))
    a_len = blend.lengths[blend_ids]
    a_start = np.concatenate([[0], np.cumsum(a_len)[:-1]]) - a_shift
    b_start = np.concatenate([[0], np.cumsum(base.lengths[base_ids])[:-1]]) - b_shift
    return text_columns(a_start, a_len, b_start)


def mode_argument(name: str) -> Mode:
    """The reference mode a command line's --mode names (argparse's `type`)."""
    try:
        return resolve_reference(name)
    except FusionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def align_fixture(fixture_dir, mode: str | Mode, out_path) -> dict:
    """Align every sequence of the fixture in reference mode `mode` ("reference-hard" or
    "reference-soft", also "hard"/"soft", or the Mode) and write the candidate .npz. Returns
    {"seconds": time spent aligning (loading excluded), "target_tokens", "sequences", "mode", "out"}."""
    folder = Path(fixture_dir)
    mode = resolve_reference(mode)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        base_strings = json.loads((folder / "base_vocab.json").read_text())
        blend_strings = json.loads((folder / "blend_vocab.json").read_text())
        inputs = np.load(folder / "inputs.npz")
        mapping = json.loads((folder / "vocab_mapping_default.json").read_text()) if mode is SOFT else None
    except (OSError, ValueError, KeyError) as exc:
        raise FusionError(f"{folder}: not a readable alignment fixture ({exc})") from exc
    base = _view(folder / "tokenizers", "base")  # the views give bytes (the band's centre); strings and
    blend = _view(folder / "tokenizers", "blend")  # markers come from the fixture's own files
    base_marker = meta.get("base_special", base.marker)
    blend_marker = meta.get("blend_special", blend.marker)

    vocab = {s: i for i, s in enumerate(base_strings)}
    spelled = [s.replace(blend_marker, base_marker) for s in blend_strings]
    hard = np.array([vocab.get(s, -1) for s in spelled], dtype=np.int32)
    if mapping is None:
        translate = match_soft = hard
        soft_lookup = None
    else:
        translate = match_soft = np.array([vocab.get(mapping.get(s), -1) for s in spelled], dtype=np.int32)
        soft_lookup = mapping.get
    canon = np.array([vocab[s] for s in base_strings], dtype=np.int32)
    a_cp = codepoints([s.replace(blend_marker, "") for s in blend_strings])
    b_cp = codepoints([s.replace(base_marker, "") for s in base_strings])
    n = int(meta.get("n_sequences", sum(name.startswith("base_ids_") for name in inputs.files)))
    sequences = [{key: inputs[f"{key}_{k:02d}"] for key in ("base_ids", "blend_ids", "topk_idx", "topk_logits")}
                 for k in range(n)]

    out, tokens = {}, 0
    started = time.perf_counter()
    for k, seq in enumerate(sequences):
        b_ids = seq["base_ids"].astype(np.int64)
        a_ids = seq["blend_ids"].astype(np.int64)
        first, last = _columns(base, blend, b_ids, a_ids)

        def first_match_of(count, row_of, a_ids=a_ids, b_ids=b_ids):
            return first_token_match(blend_strings[a_ids[row_of[0]]], base_strings[b_ids[0]], blend_marker,
                                     base_marker, blend.byte_level, soft_lookup)

        ptr, idx, val, kind = align_reference(
            a_ids, b_ids, a_cp, b_cp, first, last, hard, match_soft, translate, canon, first_match_of,
            seq["topk_idx"].astype(np.int64), seq["topk_logits"].astype(np.float64))
        out.update({f"row_ptr_{k:02d}": ptr, f"idx_{k:02d}": idx, f"val_{k:02d}": val, f"kind_{k:02d}": kind})
        tokens += len(b_ids)
    seconds = time.perf_counter() - started
    np.savez(out_path, **out)
    return {"mode": mode.fixture_name, "sequences": n, "target_tokens": tokens, "seconds": round(seconds, 4),
            "tokens_per_second": round(tokens / seconds) if seconds else None, "out": str(out_path)}


CHECKER = "check_alignment_fixture.py"


def check_candidate(fixture_dir, mode: str | Mode, candidate) -> dict:
    """Run the fixture's own checker (CHECKER, shipped in the fixture folder) on a candidate
    .npz: {"passed", "failed", "failures" (its FAIL lines), "checker"}. The checker compares
    every sequence exactly with the original code's output."""
    import re
    import subprocess

    checker = Path(fixture_dir) / CHECKER
    if not checker.is_file():
        raise FusionError(f"{fixture_dir}: no {CHECKER} in the fixture; --no-check only writes the candidate")
    proc = subprocess.run([sys.executable, str(checker), "--fixture", str(fixture_dir), "--mode",
                           resolve_reference(mode).fixture_name,
                           "--candidate", str(candidate)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    counts = re.fullmatch(r"(\d+) passed, (\d+) failed", last)
    if proc.returncode not in (0, 1) or counts is None:
        problem = (proc.stderr.strip() or last or f"exit {proc.returncode}").splitlines()[-1]
        raise FusionError(f"{checker}: the checker did not run ({problem})")
    return {"passed": int(counts[1]), "failed": int(counts[2]), "failures": [x for x in lines if ": FAIL" in x],
            "checker": str(checker)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.align.fixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", required=True, help="folder in the alignment-fixture format")
    parser.add_argument("--mode", required=True, type=mode_argument, metavar="MODE",
                        help="reference-hard or reference-soft (hard, soft: the same, short)")
    parser.add_argument("--out", required=True, help="candidate .npz to write")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(align_fixture(args.fixture, args.mode, args.out)))
    except FusionError as exc:
        from ..errors import BAD_INPUT_EXIT_CODE

        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
