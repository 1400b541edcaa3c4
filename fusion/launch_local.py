"""The local launcher: every stage of a run on this machine, skipping committed work.

Killing it at any moment and starting it again finishes the run with the same bytes: each
shard is committed by its record, and training resumes from its newest checkpoint.
"""

from __future__ import annotations

import time

from fusion import ownership, shards
from fusion.launch import AllShards, run_part
from fusion.pipeline import STAGES, attach
from fusion.run import Run


def prepare(run: Run) -> None:
    """Everything cheap that can reject bad input, before any expensive work (Pipeline.prepare)."""
    attach(run).pipeline.prepare()


def redo(run: Run, stage: str) -> None:
    """Delete the outputs of `stage` and of every later stage (checkpoints included), so they
    are computed again."""
    attach(run)
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
        for part in run.pipeline.parts(stage):
            run_part(run, stage, part, AllShards())
        timings[stage] = round(time.perf_counter() - started, 3)
        progress.stage_done(stage, count, timings[stage])
    return timings
