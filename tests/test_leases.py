"""Leases: one holder per generation, expiry and takeover, lost leases; workers refuse
outputs of another configuration and wait for their inputs."""

import time

import pytest

from fusion import leases, shards
from fusion.cli import main
from fusion.config import parse_spec
from fusion.errors import NOT_READY_EXIT_CODE, FusionError
from fusion.pipeline import open_run
from fusion.store import Store
from fusion.worker import run_worker
from tests.s3 import S3_BACKENDS, s3_store


@pytest.fixture(params=["file", *S3_BACKENDS])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "run"))
    return s3_store(request, request.param)


def test_one_holder_then_takeover_after_expiry(store):
    ttl = 3.0  # long enough for a few requests to a busy server while the lease is live
    a = leases.claim(store, "align", "src", 3, "a", ttl=ttl)
    assert a is not None and a.generation == 1
    assert leases.claim(store, "align", "src", 3, "b", ttl=ttl) is None  # live: leave it
    assert a.renew()
    time.sleep(ttl + 0.3)  # a stops renewing: its lease expires
    b = leases.claim(store, "align", "src", 3, "b", ttl=ttl)
    assert b is not None and b.generation == 2
    assert not a.renew() and a.lost  # a learns it was presumed dead
    assert leases.claim(store, "align", "src", 3, "c", ttl=ttl) is None
    b.finish()
    assert leases.newest_generations(store, "align", "src") == {}


def test_racing_claims_give_one_holder(store):
    got = [leases.claim(store, "logits", "m", 0, f"w{i}", ttl=30, newest=0) for i in range(5)]
    assert sum(g is not None for g in got) == 1


def test_released_lease_is_free_at_once(store):
    a = leases.claim(store, "logits", "m", 1, "a", ttl=60)
    a.release()
    b = leases.claim(store, "logits", "m", 1, "b", ttl=60)
    assert b is not None and b.generation == 2


def test_renewal_thread_keeps_the_lease(store):
    a = leases.claim(store, "logits", "m", 2, "a", ttl=2.0)
    a.start_renewing()
    time.sleep(4.0)  # two ttls: renewed in time, or b would claim
    assert leases.claim(store, "logits", "m", 2, "b", ttl=2.0) is None
    a.stop_renewing()


def test_worker_refuses_another_configuration(micro, tmp_path):
    spec = micro.spec(str(tmp_path / "run"), **{"split.shard_blocks": 12})
    run_worker(open_run(parse_spec(spec)), "split", log=lambda *a, **k: None)
    changed = micro.spec(str(tmp_path / "run"), **{"split.shard_blocks": 12, "split.block_tokens": 60})
    with pytest.raises(FusionError, match="the run spec changed mid-run"):
        run_worker(open_run(parse_spec(changed)), "split", log=lambda *a, **k: None)
    # a record of another configuration among this one's is refused too
    run = open_run(parse_spec(spec))
    store = run.store
    store.remove(f"split/train/{shards.COMMITTED}")
    record = store.read_json(shards.record_path("split", "train", 0))
    store.write_json(shards.record_path("split", "train", 0), {**record, "config_hash": "0123456789abcdef"})
    with pytest.raises(FusionError, match="shard-00000.json was written with config hash 0123456789abcdef"):
        run_worker(run, "split", log=lambda *a, **k: None)


def test_worker_before_its_inputs_exits_to_be_retried(micro, tmp_path):
    spec_path = micro.write_spec(tmp_path / "spec.yaml", tmp_path / "run")
    assert main(["worker", "align", str(spec_path)]) == NOT_READY_EXIT_CODE
