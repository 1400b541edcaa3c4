"""Capture once, fuse many times.

The sources' top-k distributions over the corpus are the most expensive thing a run computes
(a forward pass of every source over every block), and none of it depends on the target: the
split cuts blocks for the sources' tokenizers only (fusion/stages/split.py), and a source's
logits depend on the blocks and the source. Together they are the run's *capture*:

    split/_plan.json, split/train, split/heldout, logits/<source> for every source

A run whose spec names a capture store (`capture.store`, e.g. an earlier run's store, or a
store kept for captures) imports from it, before any stage runs, every committed capture
shard whose config hash is the one this run expects: objects copied first, the commit record
last, as any writer commits. The stages then find those shards committed and skip them; only
what depends on the target is computed (its own logits, vocab, align, fuse, train, eval). A
shard of another config (other sources, corpus or split settings) is left where it is and
computed here. Importing is idempotent and safe to repeat or interrupt.

Two targets never share one store (their vocab, align, fuse and train outputs would collide):
the second run gets its own store and names the first one's as `capture.store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion import shards
from fusion.store import Store, json_bytes

PLAN = "split/_plan.json"


@dataclass
class Imported:
    shards: dict[str, int] = field(default_factory=dict)  # "stage/part" -> shards copied
    skipped: dict[str, int] = field(default_factory=dict)  # of another config: computed here instead


def capture_parts(run) -> list[tuple[str, str]]:
    """The outputs that depend on the corpus, the split settings and the sources only."""
    return [("split", "train"), ("split", "heldout")] + [("logits", s.name) for s in run.sources]


def import_capture(run) -> Imported | None:
    """Copy the matching committed capture shards of `capture.store` into the run's store."""
    spec = run.spec.capture
    if spec.store is None:
        return None
    source = Store(spec.store, spec.store_options)
    if source.url == run.store.url:
        return Imported()
    done = Imported()
    plan = source.read_json(PLAN)
    if plan is not None and plan.get("config_hash") == run.hash("split", "train") and run.store.read_json(PLAN) is None:
        run.store.write_json(PLAN, plan, exclusive=True)
    for stage, part in capture_parts(run):
        key, expected = f"{stage}/{part}", run.hash(stage, part)
        done.shards[key] = done.skipped[key] = 0
        for index in sorted(shards.committed_indices(source, stage, part)):
            record = shards.read_record(source, stage, part, index)
            if record is None or record["config_hash"] != expected:
                done.skipped[key] += 1
                continue
            if shards.read_record(run.store, stage, part, index) is None:
                copy_shard(source, run.store, stage, part, index, record)
                done.shards[key] += 1
        committed = source.read_json(f"{shards.part_dir(stage, part)}/{shards.COMMITTED}")
        if committed is not None and committed.get("config_hash") == expected:
            if len(shards.committed_indices(run.store, stage, part)) == int(committed["shards"]):
                run.store.create(f"{shards.part_dir(stage, part)}/{shards.COMMITTED}", json_bytes(committed))
    return done


def copy_shard(source: Store, dest: Store, stage: str, part: str, index: int, record: dict) -> None:
    """A committed shard's objects, then its record (created last: the commit)."""
    folder = shards.array_path(stage, part, record)
    rels = [f"{folder}/{key}" for key in record["objects"]]
    blobs = source.get_objects(rels)
    missing = [rel for rel, blob in blobs.items() if blob is None]
    if missing:
        from fusion.errors import FusionError

        raise FusionError(f"capture: {source.uri(missing[0])} is missing (listed in its shard's record)")
    dest.put_objects(blobs)
    dest.create(shards.record_path(stage, part, index), json_bytes(record))
