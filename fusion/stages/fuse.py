"""fuse (and pack): one teacher distribution per target row, from the target's own
distribution and every aligned source (fusion/fusing.py: MinCE or AvgCE, per block or per
token), packed with the target's tokens as the training set.

Arrays per shard (as `read` gives them): tokens (target ids) and seq_ptr (block offsets), the
fused sparse rows (counts, ids, logprobs float16, tail float16), and per block `choice`: the
candidate with the best metric on the block (0 = the target itself, i = source i), for the logs.
Stored compactly and exactly (fusion/encoding.py: row-wise log-prob deltas, the real token's
id left out of its row).
The record's attrs name the target tokenizer (its hash) and vocabulary size the ids belong to,
so that training refuses packed data made for another target.
`fuse.sources` picks which sources take part (default: all); choice i is the i-th of them.
"""

from __future__ import annotations

import numpy as np

from fusion import encoding, shards
from fusion.fusing import fuse, paper_reward, sequence_metric
from fusion.run import Run
from fusion.stages import Stage
from fusion.sparse import SparseRows
from fusion.stages import align, logits, split

NAME = "fuse"
PART = "train"
FORMAT = 2  # storage format; part of the config hash


def parts(run: Run) -> list[str]:
    return [PART]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("logits", run.target.name)] + [("align", s.name) for s in run.fused_sources]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "target_logits": run.hash("logits", run.target.name),
        "aligned": [run.hash("align", s.name) for s in run.fused_sources],  # which sources, in order
        "fuse": run.spec.fuse.model_dump(mode="json", exclude={"sources"}),
        "format": FORMAT,
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


def run_shard(run: Run, part: str, index: int) -> None:
    spec = run.spec.fuse
    own = logits.read(run, run.target.name, index)
    aligned = [align.read(run, s.name, index, own["tokens"]) for s in run.fused_sources]
    candidates = [SparseRows.from_topk(own["topk_ids"], own["topk_logprobs"], own["tail"])]
    candidates += [
        SparseRows(a["counts"].astype(np.int32), a["ids"].astype(np.int32), a["logprobs"].astype(np.float32), a["tail"].astype(np.float32))
        for a in aligned
    ]
    per_model = [(own["seq_nll"], own["seq_bytes"], np.diff(own["seq_ptr"]))]
    per_model += [(a["seq_nll"], a["seq_bytes"], a["seq_tokens"]) for a in aligned]
    costs = np.stack([sequence_metric(spec.metric, *numbers) for numbers in per_model])
    vocab_size = len(run.tokenizers[run.target.name])
    fused, stats = fuse(
        candidates,
        own["seq_ptr"],
        own["tokens"].astype(np.int64),
        function=spec.function,
        level=spec.level,
        metric=costs if spec.level == "sequence" else None,
        top_k=spec.top_k,
        vocab_size=vocab_size,
        weighting=spec.weighting,
        paper_rewards=spec.paper_rewards,
    )
    if spec.paper_rewards:
        choice = np.argmax(paper_reward(costs), axis=0)  # first maximum: ties go to the target
    else:
        choice = np.argmin(costs, axis=0)
    arrays = pack(own["tokens"], own["seq_ptr"], fused, choice, vocab_size)
    attrs = {"fusion": stats, "target_tokenizer": run.tokenizer_hash(run.target.name), "vocab_size": vocab_size}
    shards.write_shard(run.store, NAME, PART, index, arrays, run.hash(NAME, PART), rows=fused.rows, attrs=attrs)


def pack(
    tokens: np.ndarray, seq_ptr: np.ndarray, fused: SparseRows, choice: np.ndarray, vocab_size: int
) -> dict[str, np.ndarray]:
    """The stored arrays of a packed shard (fusion/encoding.py)."""
    return {
        "tokens": tokens.astype(encoding.id_dtype(max(vocab_size, int(tokens.max(initial=0)) + 1))),
        "seq_len": encoding.narrow_uint(np.diff(seq_ptr)),
        **encoding.encode_rows(fused.counts, fused.ids, fused.logprobs, tokens, vocab_size),
        "tail": fused.tail.astype(np.float16),
        "choice": choice.astype(np.uint8),
    }


def read(run: Run, index: int) -> dict[str, np.ndarray]:
    """tokens, seq_ptr (int64), counts (int32), ids (int32), logprobs (float16), tail, choice."""
    return decode(shards.read_shard(run.store, NAME, PART, index, config_hash=run.hash(NAME, PART)))


def decode(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    counts, ids, logprobs = encoding.decode_rows(stored, stored["tokens"])
    return {
        "tokens": stored["tokens"],
        "seq_ptr": encoding.row_ptr(stored["seq_len"].astype(np.int64)),
        "counts": counts,
        "ids": ids,
        "logprobs": logprobs,
        "tail": stored["tail"],
        "choice": stored["choice"],
    }


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard, stored_per="token")
