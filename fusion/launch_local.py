"""The local launcher: every stage of a run on this machine, skipping committed work.

Killing it at any moment and starting it again finishes the run with the same bytes: each
shard is committed by its record, and training resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import time

from fusion import shards
from fusion.launch import AllShards, run_part
from fusion.pipeline import STAGES, attach
from fusion.run import Run


def prepare(run: Run) -> None:
    """Everything cheap that can reject bad input, before any expensive work (Pipeline.prepare)."""
    attach(run).pipeline.prepare()


def redo(run: Run, stage: str) -> None:
    """Delete the outputs of `stage` and of every later stage (checkpoints included), so they
    are computed again."""
    names = list(STAGES)
    for name in names[names.index(stage) :]:
        run.store.remove(name)


def run_all(run: Run, stages: list[str] | None = None) -> dict[str, float]:
    prepare(run)
    timings = {}
    for stage in run.pipeline.stages:
        if stages is not None and stage not in stages:
            continue
        started = time.perf_counter()
        for part in run.pipeline.parts(stage):
            run_part(run, stage, part, AllShards())
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
