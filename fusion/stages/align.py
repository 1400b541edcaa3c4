"""align: each source's distributions moved onto the target's rows and vocabulary.

Per source and shard: for every target row, the source's distribution over target ids (or
none), as sparse rows (fusion/sparse.py): counts, ids, logprobs and tail (float16); plus the
source's per-block NLL, bytes and token count, which fusion compares. Stored compactly and
exactly (fusion/encoding.py), the rows against the target's tokens (which the target's
logits hold), so the real token's id is left out where a row lists it.
"""

from __future__ import annotations

import os

import numpy as np

from fusion import encoding, shards
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import Stage
from fusion.stages import logits, split, vocab

NAME = "align"
FORMAT = 2  # storage format; part of the config hash


def parts(run: Run) -> list[str]:
    return [s.name for s in run.sources]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("split", "train"), ("logits", run.target.name), ("logits", part), ("vocab", part)]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "target_logits": run.hash("logits", run.target.name),
        "source_logits": run.hash("logits", part),
        "vocab": run.hash("vocab", part),
        "mode": run.spec.align.mode,
        "format": FORMAT,
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


def run_shard(run: Run, part: str, index: int) -> None:
    texts, _ = split.read_blocks(run, "train", index)
    target = logits.read(run, run.target.name, index, ["tokens", "seq_ptr"])
    source = logits.read(run, part, index)
    continuations = None
    from fusion.align import resolve

    if run.spec.logits.continuations > 0 and resolve(run.spec.align.mode).uses_continuations:
        from fusion.sparse import SparseRows

        cont = logits.read(run, part, index, ["cont_depth", "cont_counts", "cont_ids", "cont_logprobs", "cont_tail"])
        continuations = (cont["cont_depth"], SparseRows(cont["cont_counts"], cont["cont_ids"],
                                                         cont["cont_logprobs"].astype(np.float32),
                                                         cont["cont_tail"].astype(np.float32)))
    stats: dict = {}
    try:
        rows = _align_shard(run, part, texts, target, source, stats, continuations)
    except FusionError as e:
        raise FusionError(f"align shard {index}, source '{part}', target '{run.target.name}': {e}") from None
    target_vocab = len(run.tokenizers[run.target.name])
    arrays = {
        **encoding.encode_rows(rows.counts, rows.ids, rows.logprobs, target["tokens"], target_vocab),
        "tail": rows.tail.astype(np.float16),
        "seq_nll": source["seq_nll"],
        "seq_bytes": encoding.narrow_uint(source["seq_bytes"]),
        "seq_tokens": encoding.narrow_uint(np.diff(source["seq_ptr"])),
    }
    covered = stats["coverage"]  # rows with a source distribution (not the reference's one-hot fallback)
    shards.write_shard(
        run.store, NAME, part, index, arrays, run.hash(NAME, part), rows=rows.rows, attrs={"coverage": round(covered, 6)}
    )


def _align_shard(run: Run, part: str, texts, target: dict, source: dict, stats: dict, continuations=None):
    from fusion.align import align_blocks_parallel, resolve

    return align_blocks_parallel(
        texts,
        target["tokens"].astype(np.int64),
        target["seq_ptr"],
        source["tokens"].astype(np.int64),
        source["seq_ptr"],
        source["topk_ids"].astype(np.int64),
        source["topk_logprobs"].astype(np.float32),
        source["tail"].astype(np.float32),
        vocab.token_view(run, run.target.name),
        vocab.token_view(run, part),
        vocab.read(run, part),
        resolve(run.spec.align.mode),
        stats=stats,
        workers=run.spec.align.workers or os.cpu_count() or 1,
        source_continuations=continuations,
    )


def read(run: Run, part: str, index: int, target_tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """counts (int32), ids (int32), logprobs and tail (float16), seq_nll (float32), seq_bytes
    and seq_tokens (int64). The target's tokens of the shard are read if not given."""
    stored = shards.read_shard(run.store, NAME, part, index, config_hash=run.hash(NAME, part))
    if target_tokens is None:
        target_tokens = logits.read(run, run.target.name, index, ["tokens"])["tokens"]
    counts, ids, logprobs = encoding.decode_rows(stored, target_tokens)
    return {
        "counts": counts,
        "ids": ids,
        "logprobs": logprobs,
        "tail": stored["tail"],
        "seq_nll": stored["seq_nll"],
        "seq_bytes": stored["seq_bytes"].astype(np.int64),
        "seq_tokens": stored["seq_tokens"].astype(np.int64),
    }


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard, stored_per="token")
