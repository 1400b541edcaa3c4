"""What a stage is. Every stage module (split, vocab, logits, align, fuse, train, evaluate)
ends with one `STAGE = Stage(...)` made of its plain functions; fusion/pipeline.py lists them
in order, and launchers only ever go through the pipeline and `fusion.launch.run_part`.

    parts(run)                  the parts it writes (a model name, "train", ...)
    inputs(run, part)           the (stage, part) outputs it reads; it may start once they are committed
    fingerprint(run, part)      what determines its output; hashed into the config hash
    shard_count(run, part)      how many shards the part has
    run_shard(run, part, i)     compute shard i and commit it

Hooks, for the stages that need them (instead of launchers testing stage names):

    plan(run)                   the cheap first pass that other stages' shard counts come from
                                (split: the shard plan). Launchers prepare the run (fusion/pipeline.py:
                                Pipeline.prepare, which calls it) before a stage with a plan runs
    is_done(run, part, i)       whether shard i is committed, where one task writes several parts
                                (split writes train and heldout; default: the part's own record)

And what its stored bytes are counted per, for `fusion plan` and `fusion status`:

    stored_per                  "token" (a row of its shards is a token: logits, align, fuse),
                                "byte of text" (split: the bytes of its blocks' text), or None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    parts: Callable
    inputs: Callable
    fingerprint: Callable
    shard_count: Callable
    run_shard: Callable
    plan: Callable | None = None
    is_done: Callable | None = None
    stored_per: str | None = None
