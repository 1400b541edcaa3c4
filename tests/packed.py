"""Packed training data (what the fuse stage commits) made up directly, so that training tests
need neither the logits nor the align stage: random target tokens and random sparse teacher
rows, a few rows without a distribution, written with the real commit protocol."""

from __future__ import annotations

import numpy as np

from fusion import shards
from fusion.run import Run
from fusion.sparse import SparseRows
from fusion.stages import fuse, split


def write_packed(
    run: Run, blocks_per_shard: int = 12, seed: int = 0, top_k: int = 6, corrupt: dict | None = None
) -> int:
    """Commit fuse/train for `run`: as many shards as its split plan, `blocks_per_shard` blocks
    each. `corrupt` maps (shard, block) to a change: "nan" (a NaN teacher log-prob), "id"
    (a token id beyond the vocabulary). Returns the number of blocks."""
    rng = np.random.default_rng(seed)
    vocab = len(run.tokenizers[run.target.name])
    n_shards = len(split.plan(run)["shards"])
    config_hash = run.hash(fuse.NAME, fuse.PART)
    for s in range(n_shards):
        lengths = rng.integers(12, 41, size=blocks_per_shard)
        seq_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = rng.integers(0, vocab, size=int(seq_ptr[-1]))
        counts = rng.integers(0, top_k + 1, size=len(tokens))
        counts[rng.random(len(tokens)) < 0.1] = 0
        ids = np.concatenate([rng.choice(vocab, size=c, replace=False) for c in counts]).astype(np.int64)
        tail = rng.uniform(0.0, 0.3, size=len(tokens))
        logprobs = np.concatenate(
            [np.sort(np.log(rng.dirichlet(np.ones(c)) * (1 - t)))[::-1] for c, t in zip(counts, tail)]
        )
        for (cs, cb), kind in (corrupt or {}).items():
            if cs != s:
                continue
            a = int(seq_ptr[cb])
            if kind == "nan":
                row = int(np.argmax(counts[a:] > 0)) + a
                logprobs[int(counts[:row].sum())] = np.nan
            elif kind == "id":
                tokens[a] = vocab + 7
        rows = SparseRows(counts, ids, logprobs, tail)
        choice = rng.integers(0, 1 + len(run.sources), size=blocks_per_shard)
        arrays = fuse.pack(tokens, seq_ptr, rows, choice, vocab)
        attrs = {"target_tokenizer": run.tokenizer_hash(run.target.name), "vocab_size": vocab}
        shards.write_shard(run.store, fuse.NAME, fuse.PART, s, arrays, config_hash, rows=len(tokens), attrs=attrs)
    shards.commit_part(run.store, fuse.NAME, fuse.PART, n_shards, config_hash)
    return n_shards * blocks_per_shard
