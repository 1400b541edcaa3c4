"""One stage part on this process: the shard loop that every launcher runs.

    run_part(run, "align", "src", AllShards())      # fusion run: every pending shard, in order
    run_part(run, "logits", "target", OneShard(3))  # an Indexed Job's pod: shard 3 only
    run_part(run, "align", "src", Leases(...))      # an elastic worker (fusion/worker.py)

A claim hands out shard indices (`next`), and is told how each one went (`finished`,
`released`); whether the part is committed at the end (`_COMMITTED.json`, written after every
shard's record is checked) is the claim's `commits`. The loop itself knows no stage by name:
what differs between stages is in their Stage record (fusion/stages/__init__.py): a stage
with a `plan` has the run prepared first; a stage whose task writes several parts says when
a shard is done (`is_done`).
"""

from __future__ import annotations

from typing import Protocol

from fusion import ownership, shards
from fusion.errors import FusionError
from fusion.pipeline import attach, stage
from fusion.progress import bar
from fusion.run import Run


class Part:
    """One stage part of a run, as a claim sees it."""

    def __init__(self, run: Run, name: str, part: str):
        self.run, self.stage, self.name, self.part = run, stage(name), name, part
        self.config_hash = run.hash(name, part)
        self.shards = self.stage.shard_count(run, part)

    def is_done(self, index: int) -> bool:
        if self.stage.is_done is not None:
            return self.stage.is_done(self.run, self.part, index)
        return shards.read_record(self.run.store, self.name, self.part, index, self.config_hash) is not None

    def pending(self) -> list[int]:
        """Shards without a commit record, from one listing of the part."""
        return sorted(set(range(self.shards)) - shards.committed_indices(self.run.store, self.name, self.part))


class Claim(Protocol):
    commits: bool

    def next(self, part: Part) -> int | None: ...  # a shard to compute; None once none is left here

    def started(self, part: Part, index: int) -> None: ...

    def finished(self, part: Part, index: int, computed: bool) -> None: ...

    def released(self, part: Part, index: int) -> None: ...

    def committed(self, part: Part) -> None: ...  # the part's _COMMITTED.json was written


class AllShards:
    """Every shard not yet done, in order, with a progress bar; then the part is committed."""

    commits = True

    def __init__(self):
        self._todo = None

    def next(self, part: Part) -> int | None:
        if self._todo is None:
            pending = [i for i in range(part.shards) if not part.is_done(i)]
            self._todo = iter(bar(pending, desc=f"{part.name} {part.part}", unit="shard"))
        return next(self._todo, None)

    def finished(self, part: Part, index: int, computed: bool) -> None:
        pass

    def started(self, part: Part, index: int) -> None:
        pass

    def released(self, part: Part, index: int) -> None:
        pass

    def committed(self, part: Part) -> None:
        pass


class OneShard:
    """Shard `index` only (an Indexed Job's pod); whoever follows the run commits the part."""

    commits = False

    def __init__(self, index: int):
        self.index = index

    def next(self, part: Part) -> int | None:
        index, self.index = self.index, None
        return index

    def finished(self, part: Part, index: int, computed: bool) -> None:
        pass

    def started(self, part: Part, index: int) -> None:
        pass

    def released(self, part: Part, index: int) -> None:
        pass

    def committed(self, part: Part) -> None:
        pass


def run_part(run: Run, name: str, part: str, claim: Claim) -> dict:
    """Compute the shards of one stage part that `claim` hands out, skipping committed ones, and
    commit the part if the claim does so. Returns {"computed": n, "committed": n}."""
    attach(run).pipeline.prepare_for(name)
    ownership.check(run)  # another run's store, or a spec changed mid-run: refused before any work
    done = {"computed": 0, "committed": 0}
    config_hash = run.hash(name, part)
    if shards.is_part_committed(run.store, name, part, config_hash):
        return done
    p = Part(run, name, part)
    while (index := claim.next(p)) is not None:
        if p.is_done(index):  # committed by someone else since it was handed out
            claim.finished(p, index, computed=False)
            continue
        claim.started(p, index)
        try:
            p.stage.run_shard(run, part, index)
        except BaseException:
            claim.released(p, index)
            raise
        if not p.is_done(index):
            raise FusionError(f"{name} {part}: shard {index} ran but left no commit record")
        claim.finished(p, index, computed=True)
        done["computed"] += 1
        done["committed"] += 1
    if claim.commits:
        shards.commit_part(run.store, name, part, p.shards, config_hash)
        claim.committed(p)
    return done
