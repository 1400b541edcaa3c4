"""`fusion status`: what a run's store holds, per stage and part, read from commit records:
shards committed (and leased by elastic workers right now), tokens, stored bytes and bytes
per token. The outputs are the run's (its pipeline, from the spec in run.json) and their shard
counts run.json's (written when the run is prepared), so no model is loaded to read a store.

`status(store)` takes an open Store (a Run's: the spec's store_options apply), used as it is, or
a URL. A URL is reached bare (an s3:// one through the AWS environment: AWS_ENDPOINT_URL, ...)
only to read run.json; everything after that goes through the store settings of the spec it
records (`recorded_run`), as the run's own processes reach the store."""

from __future__ import annotations

import time

from fusion import leases, shards
from fusion.config import parse_spec
from fusion.errors import FusionError
from fusion.pipeline import attach
from fusion.run import RUN_RECORD, Run
from fusion.store import Store


def live_leases(store: Store, stage: str, part: str) -> int:
    """Uncommitted shards that a worker holds a live lease on."""
    newest = leases.newest_generations(store, stage, part)
    pending = set(newest) - shards.committed_indices(store, stage, part)
    now = time.time()
    return sum(leases.is_live(store.read_json(leases.lease_path(stage, part, i, newest[i])), now) for i in pending)


def recorded_run(store: Store | str) -> tuple[Run, dict]:
    """The run a store's run.json records, with its pipeline (the topology; no model is loaded),
    and the record. The run's store is `store` if it is an open Store, else the URL opened with
    the recorded spec's store_options."""
    bare = store if isinstance(store, Store) else Store(store)
    record = bare.read_json(RUN_RECORD)
    if record is None:
        raise FusionError(f"{bare.uri(RUN_RECORD)} does not exist: not a fusion run store")
    spec = parse_spec(record["spec"], bare.uri(RUN_RECORD))
    run = attach(Run(spec, bare.url), build_models=False)
    if isinstance(store, Store):
        run.store = store  # the caller's, with whatever it set (fusion/k8s/check.py shortens the outage wait)
    return run, record


def status(store: Store | str) -> dict:
    run, record = recorded_run(store)
    store, pipeline = run.store, run.pipeline
    outputs = record.get("outputs", {})  # none yet: the run is not prepared
    rows = []
    for stage, stage_record in pipeline.stages.items():
        per_token = stage_record.stored_per == "token"  # bytes per row is bytes per token there
        for part in pipeline.parts(stage):
            s = shards.part_status(store, stage, part)
            leased = 0 if s.complete else live_leases(store, stage, part)
            rows.append(
                {
                    "stage": stage,
                    "part": part,
                    "shards": s.committed,
                    "leased": leased,
                    "total": outputs.get(f"{stage}/{part}", {}).get("shards"),
                    "complete": s.complete,
                    "rows": s.rows,
                    "bytes": s.stored_bytes,
                    "bytes_per_row": round(s.stored_bytes / s.rows, 2) if s.rows and per_token else None,
                }
            )
    return {"run": run.spec.name, "store": store.url, "parts": rows}


def format_status(report: dict) -> str:
    lines = [f"run {report['run']} at {report['store']}", f"{'stage':<7} {'part':<14} {'shards':>11} {'rows':>11} {'bytes':>13} {'B/token':>8}"]
    for r in report["parts"]:
        total = "?" if r["total"] is None else r["total"]
        mark = " done" if r["complete"] else (f" ({r['leased']} in progress)" if r.get("leased") else "")
        per = "" if r["bytes_per_row"] is None else f"{r['bytes_per_row']:.1f}"
        lines.append(f"{r['stage']:<7} {r['part']:<14} {r['shards']:>5} of {total:<3} {r['rows']:>11,} {r['bytes']:>13,} {per:>8}{mark}")
    return "\n".join(lines)
