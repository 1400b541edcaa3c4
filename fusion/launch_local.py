"""The local launcher: every stage of a run on this machine, skipping committed work.

Killing it at any moment and starting it again finishes the run with the same bytes: each
shard is committed by its record, and training resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import time

from fusion import shards
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
    split.plan(run)  # reads every document: empty or non-UTF-8 corpora fail here
    run.write_record()


def redo(run: Run, stage: str) -> None:
    """Delete the outputs of `stage` and of every later stage (checkpoints included), so they
    are computed again."""
    names = list(STAGES)
    for name in names[names.index(stage) :]:
        run.store.remove(name)


def run_all(run: Run, stages: list[str] | None = None) -> dict[str, float]:
    prepare(run)
    timings = {}
    for stage, module in STAGES.items():
        if stages is not None and stage not in stages:
            continue
        started = time.perf_counter()
        for part in module.parts(run):
            run_part(run, stage, part)
        timings[stage] = round(time.perf_counter() - started, 2)
        print(f"[fusion] {stage}: done in {timings[stage]:.1f} s", flush=True)
    run.store.write_json("logs/local-timings.json", timings)
    return timings


def summary(run: Run) -> str:
    report = run.store.read_json("eval/report/shard-00000.json")
    lines = [f"[fusion] run '{run.spec.name}' complete in {run.store.url}"]
    if report is not None:
        lines.append(f"[fusion] fused model: {run.store.uri(shards.files_path('train', 'model', 0))}")
        lines.append(f"[fusion] report:      {run.store.uri(shards.files_path('eval', 'report', 0))}/report.json")
        blob = run.store.read_bytes(f"{shards.files_path('eval', 'report', 0)}/report.json")
        if blob:
            for r in json.loads(blob)["results"]:
                lines.append(f"[fusion]   {r['model']:<28} {r['bits_per_byte']:.4f} bits/byte")
    return "\n".join(lines)
