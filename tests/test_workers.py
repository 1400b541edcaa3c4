"""Elastic workers against S3: killed workers, new workers and failing requests lose nothing
and commit every shard exactly once, with the same bytes as a single worker."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fusion import shards
from fusion.config import parse_spec
from fusion.launch_local import run_all
from fusion.pipeline import open_run
from fusion.run import Run
from fusion.stages import logits
from fusion.worker import run_worker
from tests.s3 import FaultyProxy, record_puts

REPO = Path(__file__).resolve().parents[1]
STAGE, PART = "logits", "target"


def spec_for(micro, url: str, endpoint: str) -> dict:
    spec = micro.spec(url, **{"split.shard_blocks": 8, "corpus.max_documents": 14})
    spec["store_options"] = {"endpoint_url": endpoint, "connect_timeout": 2, "read_timeout": 2, "max_attempts": 12}
    return spec


def prepare(spec: dict) -> Run:
    run = open_run(parse_spec(spec))
    run_all(run, ["split"])
    return run


def objects_of(run: Run) -> dict[str, bytes]:
    """The committed output of the part: records, and the objects of the folders they name."""
    records = run.store.get_objects([shards.record_path(STAGE, PART, i) for i in range(logits.shard_count(run, PART))])
    keys = []
    for blob in records.values():
        record = json.loads(blob)
        keys += [f"{shards.part_dir(STAGE, PART)}/{record['path']}/{key}" for key in record["objects"]]
    return {**records, **run.store.get_objects(keys)}


def start_worker(spec_path: Path, log: Path, lease_seconds: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUSION_WORKER_ID": log.stem}  # threads: same bytes as the reference
    cmd = [sys.executable, "-m", "fusion", "worker", STAGE, str(spec_path), "--part", PART]
    cmd += ["--lease-seconds", str(lease_seconds), "--poll-seconds", "0.5"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def claimed(log: Path) -> bool:
    return any(e["event"] == "claimed" for e in events(log))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# Kills alone against the emulator, kills and faults against the real server: each combination
# costs a minute, and the other two add no path the suite does not already take.
@pytest.mark.parametrize(("s3_backend", "fault_rate"), [("moto", 0.0), ("seaweedfs", 0.1)], indirect=["s3_backend"])
def test_pool_with_kills_and_faults(micro, s3_endpoint, s3_bucket, tmp_path, fault_rate):
    proxy = FaultyProxy(s3_endpoint, rate=0.0, seed=7, stall_seconds=3.0)
    try:
        # the reference: one worker, in this process, no faults
        ref = prepare(spec_for(micro, f"s3://{s3_bucket}/ref", proxy.url))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_worker(ref, STAGE, [PART], worker="reference", lease_seconds=30, log=lambda *a, **k: None)
        finally:
            torch.set_num_threads(threads)
        expected = objects_of(ref)

        spec = spec_for(micro, f"s3://{s3_bucket}/pool", proxy.url)
        pool = prepare(spec)
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        n_shards = logits.shard_count(pool, PART)
        assert n_shards >= 6
        proxy.writes.clear()
        proxy.rate, proxy.enabled = fault_rate, True

        rng = random.Random(fault_rate)
        logs = [tmp_path / f"w{i}.log" for i in range(7)]
        procs = [start_worker(spec_path, logs[i], lease_seconds=4) for i in range(4)]
        victims = rng.sample(range(4), 2)
        for v in victims:  # SIGKILL each victim at a random moment soon after it claims a shard
            wait_for(lambda v=v: claimed(logs[v]) or procs[v].poll() is not None, 120, f"worker {v} to claim")
            time.sleep(rng.uniform(0.0, 0.5))
            procs[v].send_signal(signal.SIGKILL)
        procs += [start_worker(spec_path, logs[i], lease_seconds=4) for i in range(4, 7)]
        for p in procs:
            p.wait(timeout=240)
        proxy.enabled = False

        for i, p in enumerate(procs):
            if i in victims:
                assert p.returncode == -signal.SIGKILL
            else:
                assert p.returncode == 0, logs[i].read_text()[-3000:]
        # every shard committed, its record written exactly once, the part committed once
        assert shards.is_part_committed(pool.store, STAGE, PART, pool.hash(STAGE, PART))
        puts = record_puts(proxy.writes, f"/pool/{STAGE}/{PART}/")
        assert len(puts) == n_shards + 1 and set(puts.values()) == {1}, puts
        # the same bytes as the single worker, and nothing left behind
        got = objects_of(pool)
        assert got == expected
        leftovers = [n for n in pool.store.list(shards.part_dir(STAGE, PART)) if n.endswith(".zarr")]
        assert len(leftovers) == n_shards
        assert pool.store.list(f"{shards.part_dir(STAGE, PART)}/_leases") == []
        # a victim's shard was taken over by another worker (a newer lease generation)
        claimed_by_victims = {e["shard"] for v in victims for e in events(logs[v]) if e["event"] == "claimed"}
        takeovers = [
            e for i, log in enumerate(logs) if i not in victims for e in events(log)
            if e["event"] == "claimed" and e["shard"] in claimed_by_victims and e["generation"] > 1
        ]
        assert takeovers, "no shard of a killed worker was taken over"
        if fault_rate:
            assert proxy.counts["refuse"] + proxy.counts["lose"] + proxy.counts["stall"] >= 10, proxy.counts
    finally:
        proxy.stop()
