"""Elastic workers: any sharded stage as a pool of processes that claim shards by lease.

    fusion worker STAGE SPEC [--part PART] [--store URL] [--lease-seconds S]

Each worker repeatedly lists the part's commit records and leases, claims a pending shard
whose lease is free or expired (fusion/leases.py), computes and commits it, and goes on.
While other workers hold the last shards it waits, so that a shard whose worker dies is
still taken over; when every shard has its record it creates the part's _COMMITTED.json and
moves to the next part, and exits once all are done. Workers can be added or killed at any
moment: nothing is lost (a dead worker's lease expires) and nothing is committed twice (the
record is created once).

Events go to stdout as JSON lines (claimed, committed, released, part-committed, done) for
logs and tests; they never hold credentials.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time

from fusion import leases, ownership, shards
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import STAGES


class InputsNotReady(Exception):
    """An input of the stage is not committed yet (retry later; not bad input)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def check_inputs(run: Run, stage: str, part: str) -> None:
    for in_stage, in_part in STAGES[stage].inputs(run, part):
        if not shards.is_part_committed(run.store, in_stage, in_part, run.hash(in_stage, in_part)):
            raise InputsNotReady(f"{stage} {part}: input {in_stage}/{in_part} is not committed yet")


def run_worker(
    run: Run,
    stage: str,
    parts: list[str] | None = None,
    worker: str | None = None,
    lease_seconds: float = 300.0,
    poll_seconds: float = 5.0,
    log=emit,
) -> dict:
    """Work on the stage's parts until every shard is committed. Returns counts."""
    if stage not in STAGES:
        raise FusionError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    module = STAGES[stage]
    known = module.parts(run)
    parts = parts or known
    for part in parts:
        if part not in known:
            raise FusionError(f"stage {stage} has no part {part!r} (parts: {', '.join(known)})")
    worker = worker or default_worker_id()
    rng = random.Random(worker)  # workers try shards in different orders: fewer collisions
    if stage == "split":
        from fusion.launch_local import prepare

        prepare(run)  # the plan is created once, whoever comes first
    else:
        ownership.check(run)  # another run's store, or a spec changed mid-run: refused before any work
    done = {"computed": 0, "committed": 0}
    for part in parts:
        check_inputs(run, stage, part)
        config_hash = run.hash(stage, part)
        if shards.is_part_committed(run.store, stage, part, config_hash):
            continue
        n = module.shard_count(run, part)
        while True:
            pending = sorted(set(range(n)) - shards.committed_indices(run.store, stage, part))
            if not pending:
                shards.commit_part(run.store, stage, part, n, config_hash)
                log("part-committed", worker=worker, stage=stage, part=part)
                break
            lease = _claim_one(run, stage, part, pending, worker, lease_seconds, rng)
            if lease is None:  # every pending shard is leased by a live worker: wait for them
                time.sleep(poll_seconds * (0.5 + rng.random()))
                continue
            outcome = _work(run, module, stage, part, lease, config_hash, log)
            done["computed"] += outcome != "skipped"
            done["committed"] += outcome == "committed"
    log("done", worker=worker, stage=stage, **done)
    return done


def _claim_one(run: Run, stage: str, part: str, pending: list[int], worker: str, ttl: float, rng: random.Random):
    newest = leases.newest_generations(run.store, stage, part)
    order = pending[:]
    rng.shuffle(order)
    for index in order:
        lease = leases.claim(run.store, stage, part, index, worker, ttl, newest.get(index, 0))
        if lease is not None:
            return lease
    return None


def _work(run: Run, module, stage: str, part: str, lease: leases.Lease, config_hash: str, log) -> str:
    """Compute and commit the leased shard. Returns 'committed' or 'skipped' (found committed)."""
    index, worker = lease.index, lease.worker
    if shards.read_record(run.store, stage, part, index, config_hash) is not None:
        lease.finish()  # committed between our listing and our claim
        return "skipped"
    log("claimed", worker=worker, stage=stage, part=part, shard=index, generation=lease.generation)
    lease.start_renewing(on_error=lambda e: log("renew-failed", worker=worker, shard=index, error=type(e).__name__))
    try:
        before = time.perf_counter()
        module.run_shard(run, part, index)
        record = shards.read_record(run.store, stage, part, index, config_hash)
    except BaseException:
        lease.release()
        log("released", worker=worker, stage=stage, part=part, shard=index)
        raise
    lease.finish()
    if record is None:
        raise FusionError(f"{stage} {part}: shard {index} ran but left no commit record")
    seconds = round(time.perf_counter() - before, 3)
    log("committed", worker=worker, stage=stage, part=part, shard=index, seconds=seconds, lost_lease=lease.lost)
    return "committed"
