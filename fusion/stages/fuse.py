"""fuse (and pack): one teacher distribution per target row, from the target's own
distribution and every aligned source (fusion/fusing.py: MinCE or AvgCE, per block or per
token), packed with the target's tokens as the training set.

Arrays per shard: tokens (target ids) and seq_ptr (block offsets), the fused sparse rows
(counts uint8, ids, logprobs float16, tail float16), and per block `choice`: the candidate
with the best metric on the block (0 = the target itself, i = the i-th fused source), for the logs.
`fuse.sources` picks which sources take part (default: all).
"""

from __future__ import annotations

import numpy as np

from fusion import shards
from fusion.fusing import fuse, paper_reward, sequence_metric
from fusion.run import Run
from fusion.sparse import SparseRows
from fusion.stages import align, logits, split

NAME = "fuse"
PART = "train"


def parts(run: Run) -> list[str]:
    return [PART]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("logits", run.target.name)] + [("align", s.name) for s in run.fused_sources]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "target_logits": run.hash("logits", run.target.name),
        "aligned": [run.hash("align", s.name) for s in run.fused_sources],  # which sources, in order
        "fuse": run.spec.fuse.model_dump(mode="json", exclude={"sources"}),
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


def run_shard(run: Run, part: str, index: int) -> None:
    spec = run.spec.fuse
    own = logits.read(run, run.target.name, index)
    aligned = [align.read(run, s.name, index) for s in run.fused_sources]
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
    arrays = {
        "tokens": own["tokens"],
        "seq_ptr": own["seq_ptr"],
        "counts": fused.counts.astype(np.uint8),
        "ids": fused.ids.astype(own["tokens"].dtype),
        "logprobs": fused.logprobs.astype(np.float16),
        "tail": fused.tail.astype(np.float16),
        "choice": choice.astype(np.uint8),
    }
    shards.write_shard(run.store, NAME, PART, index, arrays, run.hash(NAME, PART), rows=fused.rows, attrs={"fusion": stats})


def read(run: Run, index: int) -> dict[str, np.ndarray]:
    return shards.read_shard(run.store, NAME, PART, index)
