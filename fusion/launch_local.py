"""The local launcher: every stage of a run on this machine, skipping committed work.

Killing it at any moment and starting it again finishes the run with the same bytes: each
shard is committed by its record, and training resumes from its newest checkpoint.
"""

from __future__ import annotations

import time

from fusion import ownership, shards
from fusion.progress import bar
from fusion.run import Run
from fusion.stages import STAGES, split


def shard_done(run: Run, stage: str, part: str, index: int) -> bool:
    module = STAGES[stage]
    if hasattr(module, "is_done"):
        return module.is_done(run, part, index)
    return shards.read_record(run.store, stage, part, index, run.hash(stage, part)) is not None


def run_part(run: Run, stage: str, part: str) -> None:
    """Compute and commit every missing shard of one stage part."""
    module = STAGES[stage]
    config_hash = run.hash(stage, part)
    if shards.is_part_committed(run.store, stage, part, config_hash):
        return
    n = module.shard_count(run, part)
    pending = [i for i in range(n) if not shard_done(run, stage, part, i)]
    for i in bar(pending, desc=f"{stage} {part}", unit="shard"):
        module.run_shard(run, part, i)
    shards.commit_part(run.store, stage, part, n, config_hash)


def prepare(run: Run) -> None:
    """Everything cheap that can reject bad input, before any expensive work."""
    run.preflight()
    ownership.claim(run)  # another run's store, or changed settings, is refused here
    split.plan(run)  # reads every document: empty or non-UTF-8 corpora fail here
    run.write_record()


def redo(run: Run, stage: str) -> None:
    """Delete the outputs of `stage` and of every later stage (checkpoints included), so they
    are computed again."""
    ownership.claim(run, redo=stage)  # only this run's store, and only if earlier outputs stay valid
    names = list(STAGES)
    for name in names[names.index(stage) :]:
        run.store.remove(name)
    ownership.adopt(run)


def run_all(run: Run, stages: list[str] | None = None, progress=None) -> dict[str, float]:
    """Run the stages (default all) in order; returns each one's wall time in seconds.
    `progress` (a fusion.summary.Progress, made here if not given) reports each stage: the
    shards computed and reused, and the estimated time left."""
    from fusion import summary

    prepare(run)
    selected = [s for s in STAGES if stages is None or s in stages]
    progress = progress or summary.Progress(run, selected)
    progress.start()
    timings = {}
    for stage in selected:
        count = summary.count_shards(run, stage)
        started = time.perf_counter()
        for part in STAGES[stage].parts(run):
            run_part(run, stage, part)
        timings[stage] = round(time.perf_counter() - started, 2)
        progress.stage_done(stage, count, timings[stage])
    return timings
