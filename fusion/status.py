"""`fusion status`: what a run's store holds, per stage and part, read from commit records:
shards committed (and leased by elastic workers right now), tokens, stored bytes and bytes
per token. The outputs are the run's (its pipeline, from the spec in run.json) and their shard
counts run.json's (written when the run is prepared), so no model is loaded to read a store.

`status(store)` takes an open Store (a Run's: the spec's store_options apply) or a URL; a bare
s3:// URL is reached through the AWS environment (AWS_ENDPOINT_URL, ...)."""

from __future__ import annotations

import time

from fusion import leases, shards
from fusion.config import parse_spec
from fusion.errors import FusionError
from fusion.pipeline import attach
from fusion.run import RUN_RECORD, Run
from fusion.store import Store

# the arrays whose rows are tokens: bytes per row is bytes per token there
TOKEN_ROWS = ("logits", "align", "fuse")


def live_leases(store: Store, stage: str, part: str) -> int:
    """Uncommitted shards that a worker holds a live lease on."""
    newest = leases.newest_generations(store, stage, part)
    pending = set(newest) - shards.committed_indices(store, stage, part)
    now = time.time()
    return sum(leases.is_live(store.read_json(leases.lease_path(stage, part, i, newest[i])), now) for i in pending)


def status(store: Store | str) -> dict:
    store = store if isinstance(store, Store) else Store(store)
    record = store.read_json(RUN_RECORD)
    if record is None:
        raise FusionError(f"{store.uri(RUN_RECORD)} does not exist: not a fusion run store")
    spec = parse_spec(record["spec"], store.uri(RUN_RECORD))
    pipeline = attach(Run(spec, store.url), build_models=False).pipeline  # the topology; no model is loaded
    outputs = record.get("outputs", {})  # none yet: the run is not prepared
    rows = []
    for stage in pipeline.stages:
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
                    "bytes_per_row": round(s.stored_bytes / s.rows, 2) if s.rows and stage in TOKEN_ROWS else None,
                }
            )
    return {"run": spec.name, "store": store.url, "parts": rows}


def format_status(report: dict) -> str:
    lines = [f"run {report['run']} at {report['store']}", f"{'stage':<7} {'part':<14} {'shards':>11} {'rows':>11} {'bytes':>13} {'B/token':>8}"]
    for r in report["parts"]:
        total = "?" if r["total"] is None else r["total"]
        mark = " done" if r["complete"] else (f" ({r['leased']} in progress)" if r.get("leased") else "")
        per = "" if r["bytes_per_row"] is None else f"{r['bytes_per_row']:.1f}"
        lines.append(f"{r['stage']:<7} {r['part']:<14} {r['shards']:>5} of {total:<3} {r['rows']:>11,} {r['bytes']:>13,} {per:>8}{mark}")
    return "\n".join(lines)
