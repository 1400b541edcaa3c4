"""vocab: for each source, a table from source token ids to target token ids (-1: none).

How tokens are matched depends on align.mode (fusion/align/vocab.py):
- default: the target token with the same bytes, else the longest target token whose bytes are a
  prefix of the source token's (never a look-alike by edit distance);
- reference-soft: the FuseLLM code's rule, the target token with the same string, else the one
  nearest by edit distance of the token strings (ties to the lowest id);
- reference-hard: the same string only.
"""

from __future__ import annotations

import numpy as np

from fusion import shards
from fusion.run import Run
from fusion.stages import Stage

NAME = "vocab"


def parts(run: Run) -> list[str]:
    return [s.name for s in run.sources]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return []


def fingerprint(run: Run, part: str) -> dict:
    return {
        "source_tokenizer": run.tokenizer_hash(part),
        "target_tokenizer": run.tokenizer_hash(run.target.name),
        "mode": run.spec.align.mode,
    }


def shard_count(run: Run, part: str) -> int:
    return 1


_views: dict[str, object] = {}


def token_view(run: Run, name: str):
    """The alignment's view of a model's tokenizer, built once per process."""
    from fusion.align import token_view as build

    key = run.tokenizer_hash(name)
    if key not in _views:
        _views[key] = build(run.tokenizers[name], name)
    return _views[key]


def run_shard(run: Run, part: str, index: int) -> None:
    from fusion.align import resolve

    mapping = resolve(run.spec.align.mode).vocab_map(token_view(run, part), token_view(run, run.target.name))
    mapping = np.asarray(mapping, dtype=np.int32)
    covered = float((mapping >= 0).mean()) if len(mapping) else 0.0
    shards.write_shard(
        run.store, NAME, part, 0, {"mapping": mapping}, run.hash(NAME, part), rows=len(mapping), attrs={"mapped_share": round(covered, 6)}
    )


def read(run: Run, part: str) -> np.ndarray:
    return shards.read_shard(run.store, NAME, part, 0)["mapping"]


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard)
