"""align: each source's distributions moved onto the target's rows and vocabulary.

Per source and shard: for every target row, the source's distribution over target ids (or
none), as sparse rows (fusion/sparse.py): counts (uint8), ids (narrow), logprobs and tail
(float16); plus the source's per-block NLL, bytes and token count, which fusion compares.
"""

from __future__ import annotations

import os

import numpy as np

from fusion import shards
from fusion.run import Run
from fusion.stages import logits, split, vocab

NAME = "align"


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
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


def run_shard(run: Run, part: str, index: int) -> None:
    from fusion.align import align_blocks_parallel

    texts, _ = split.read_blocks(run, "train", index)
    target = logits.read(run, run.target.name, index, ["tokens", "seq_ptr"])
    source = logits.read(run, part, index)
    stats: dict = {}
    rows = align_blocks_parallel(
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
        run.spec.align.mode,
        stats=stats,
        workers=run.spec.align.workers or os.cpu_count() or 1,
    )
    target_vocab = len(run.tokenizers[run.target.name])
    arrays = {
        "counts": rows.counts.astype(np.uint8),
        "ids": rows.ids.astype(logits.id_dtype(target_vocab)),
        "logprobs": rows.logprobs.astype(np.float16),
        "tail": rows.tail.astype(np.float16),
        "seq_nll": source["seq_nll"],
        "seq_bytes": source["seq_bytes"],
        "seq_tokens": np.diff(source["seq_ptr"]),
    }
    covered = stats["coverage"]  # rows with a source distribution (not the reference's one-hot fallback)
    shards.write_shard(
        run.store, NAME, part, index, arrays, run.hash(NAME, part), rows=rows.rows, attrs={"coverage": round(covered, 6)}
    )


def read(run: Run, part: str, index: int) -> dict[str, np.ndarray]:
    return shards.read_shard(run.store, NAME, part, index)
