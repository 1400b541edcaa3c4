"""Leases: how elastic workers claim shards without a coordinator.

    <run>/<stage>/<part>/_leases/shard-00017.g000003.json   {"worker", "expires", "released"}

A shard's leases are numbered generations; the newest one rules. To claim a shard, a worker
creates the next generation with create-if-absent, which succeeds for exactly one worker:

- no lease yet                    -> create generation 1
- newest lease expired or released -> create generation n + 1 (taking over a dead worker's shard)
- newest lease live               -> someone is working on it; leave it

The holder renews its lease (rewrites its own generation with a later expiry) every
`ttl / 4` seconds from a background thread, so a lease outlives its worker by at most `ttl`.
A worker that finds a newer generation than its own has lost the lease (it was presumed
dead): it stops renewing and does not commit. Correctness never depends on timing, though:
two workers that both compute a shard write separate content-addressed folders and the
commit record is created once (fusion/shards.py). Leases only keep work from being repeated.

Expiry uses the workers' wall clocks (seconds since the epoch), which on a cluster agree to
well within the default ttl of a few minutes (NTP). Once a shard is committed, its leases
are deleted.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from fusion import shards
from fusion.store import Store, json_bytes

LEASES = "_leases"
NAME = re.compile(r"^shard-(\d{5})\.g(\d{6})\.json$")


def lease_dir(stage: str, part: str) -> str:
    return f"{shards.part_dir(stage, part)}/{LEASES}"


def lease_path(stage: str, part: str, index: int, generation: int) -> str:
    return f"{lease_dir(stage, part)}/{shards.shard_name(index)}.g{generation:06d}.json"


def newest_generations(store: Store, stage: str, part: str) -> dict[int, int]:
    """shard index -> its newest lease generation, from one listing."""
    out: dict[int, int] = {}
    for name in store.list(lease_dir(stage, part)):
        m = NAME.match(name)
        if m:
            index, gen = int(m.group(1)), int(m.group(2))
            out[index] = max(out.get(index, 0), gen)
    return out


def is_live(info: dict | None, now: float) -> bool:
    return bool(info) and not info.get("released") and float(info.get("expires", 0)) > now


@dataclass
class Lease:
    store: Store
    stage: str
    part: str
    index: int
    generation: int
    worker: str
    ttl: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def rel(self) -> str:
        return lease_path(self.stage, self.part, self.index, self.generation)

    def body(self, released: bool = False) -> bytes:
        expires = 0.0 if released else time.time() + self.ttl
        return json_bytes({"worker": self.worker, "token": self.token, "expires": expires, "released": released})

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) if a newer generation exists."""
        if self.lost:
            return False
        if newest_generations(self.store, self.stage, self.part).get(self.index, 0) > self.generation:
            self.lost = True
            return False
        self.store.write_bytes(self.rel, self.body())
        return True

    def start_renewing(self, on_error=None) -> None:
        def loop():
            while not self._stop.wait(self.ttl / 4):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # a failed renewal is retried next round; the lease may lapse
                    if on_error is not None:
                        on_error(e)

        self._thread = threading.Thread(target=loop, name=f"lease-{self.index}", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Give the shard back uncommitted (after an error): the next claimant may take it."""
        self.stop_renewing()
        if not self.lost:
            self.store.write_bytes(self.rel, self.body(released=True))

    def finish(self) -> None:
        """The shard is committed: its leases are no longer needed."""
        self.stop_renewing()
        for gen in range(1, self.generation + 1):
            self.store.remove(lease_path(self.stage, self.part, self.index, gen))


def claim(
    store: Store, stage: str, part: str, index: int, worker: str, ttl: float, newest: int | None = None
) -> Lease | None:
    """Try to claim a shard; the Lease if this worker now holds it, else None.

    `newest` is the shard's newest generation if the caller has just listed them."""
    if newest is None:
        newest = newest_generations(store, stage, part).get(index, 0)
    if newest:
        info = store.read_json(lease_path(stage, part, index, newest))
        if info is None:  # deleted meanwhile: the shard was just committed
            return None
        if is_live(info, time.time()):
            return None
    lease = Lease(store, stage, part, index, newest + 1, worker, ttl)
    if not store.create(lease.rel, lease.body()):
        return None  # another worker created this generation first
    return lease
