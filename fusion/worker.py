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
from fusion.launch import Part, run_part
from fusion.pipeline import attach
from fusion.run import Run


class InputsNotReady(Exception):
    """An input of the stage is not committed yet (retry later; not bad input)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def check_inputs(run: Run, stage: str, part: str) -> None:
    for in_stage, in_part in run.pipeline.inputs(stage, part):
        if not shards.is_part_committed(run.store, in_stage, in_part, run.hash(in_stage, in_part)):
            raise InputsNotReady(f"{stage} {part}: input {in_stage}/{in_part} is not committed yet")


class Leases:
    """The claim of an elastic worker: a pending shard whose lease it could take, renewed while
    the shard is computed; while others hold the last shards it waits for them (a dead
    worker's lease expires), and once every shard has its record the part is committed."""

    commits = True

    def __init__(self, worker: str, lease_seconds: float, poll_seconds: float, log):
        self.worker, self.ttl, self.poll, self.log = worker, lease_seconds, poll_seconds, log
        self.rng = random.Random(worker)  # workers try shards in different orders: fewer collisions
        self.lease: leases.Lease | None = None
        self.since = 0.0

    def next(self, part: Part) -> int | None:
        while True:
            pending = part.pending()
            if not pending:
                return None
            lease = self._claim_one(part, pending)
            if lease is None:  # every pending shard is leased by a live worker: wait for them
                time.sleep(self.poll * (0.5 + self.rng.random()))
                continue
            self.lease = lease
            return lease.index

    def _claim_one(self, part: Part, pending: list[int]):
        newest = leases.newest_generations(part.run.store, part.name, part.part)
        order = pending[:]
        self.rng.shuffle(order)
        for index in order:
            lease = leases.claim(part.run.store, part.name, part.part, index, self.worker, self.ttl, newest.get(index, 0))
            if lease is not None:
                return lease
        return None

    def started(self, part: Part, index: int) -> None:
        lease, worker = self.lease, self.worker
        self.log("claimed", worker=worker, stage=part.name, part=part.part, shard=index, generation=lease.generation)
        lease.start_renewing(on_error=lambda e: self.log("renew-failed", worker=worker, shard=index, error=type(e).__name__))
        self.since = time.perf_counter()

    def finished(self, part: Part, index: int, computed: bool) -> None:
        self.lease.finish()
        if computed:
            seconds = round(time.perf_counter() - self.since, 3)
            self.log("committed", worker=self.worker, stage=part.name, part=part.part, shard=index, seconds=seconds,
                     lost_lease=self.lease.lost)

    def released(self, part: Part, index: int) -> None:
        self.lease.release()
        self.log("released", worker=self.worker, stage=part.name, part=part.part, shard=index)

    def committed(self, part: Part) -> None:
        self.log("part-committed", worker=self.worker, stage=part.name, part=part.part)


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
    pipeline = attach(run).pipeline
    parts = pipeline.check_parts(stage, parts)
    ownership.check(run)  # another run's store, or a spec changed mid-run: refused before any work
    worker = worker or default_worker_id()
    claim = Leases(worker, lease_seconds, poll_seconds, log)
    done = {"computed": 0, "committed": 0}
    for part in parts:
        check_inputs(run, stage, part)
        counts = run_part(run, stage, part, claim)
        done = {k: done[k] + counts[k] for k in done}
    log("done", worker=worker, stage=stage, **done)
    return done
