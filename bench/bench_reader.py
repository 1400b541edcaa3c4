"""Blocks per second the training-side reader delivers, against what a trainer consumes.

    python bench/bench_reader.py [--shards 4] [--blocks 64] [--steps 24]

Writes a packed set (fuse stage shards) of 2048-token blocks with top-10 rows over a 32000
vocabulary to a local store and to an S3 server (moto, on 127.0.0.1), then measures, side by
side in one process:
- reader_local / reader_s3: the trainer's reader (fusion/training/data.py) with prefetch,
  batch 8, fully collated tensors, 2 lanes and windows of one shard, so shards are downloaded
  while it runs
- trainer_cpu: one training step (forward, fusion loss, backward, AdamW) of a tiny Llama
  (hidden 128, 2 layers, 32000 vocabulary) at batch 8 x 2048 on this CPU
Prints JSON with blocks per second and ratios (reader / trainer: how many times faster the
reader is than the training it feeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fusion import shards  # noqa: E402
from fusion.config import StoreOptionsSpec  # noqa: E402
from fusion.sparse import SparseRows  # noqa: E402
from fusion.stages import fuse  # noqa: E402
from fusion.store import Store  # noqa: E402
from fusion.training.data import PackedReader  # noqa: E402

VOCAB, LENGTH, K, BATCH = 32000, 2048, 10, 8


def packed_shard(seed: int, blocks: int):
    rng = np.random.default_rng(seed)
    n = blocks * LENGTH
    tokens = rng.zipf(1.3, size=n) % VOCAB
    ids = (rng.zipf(1.3, size=(n, K)) % VOCAB).astype(np.int64)
    ids = np.where(np.arange(K)[None] == 0, tokens[:, None], ids + np.arange(K)[None] * 7) % VOCAB  # distinct-ish
    lp = np.sort(-rng.exponential(1.5, size=(n, K)), axis=1)[:, ::-1].astype(np.float16)
    rows = SparseRows.from_topk(ids, lp.astype(np.float32), rng.random(n).astype(np.float16).astype(np.float32))
    ptr = np.arange(0, n + 1, LENGTH, dtype=np.int64)
    return tokens, ptr, rows, rng.integers(0, 4, size=blocks).astype(np.uint8)


def write_packed(store: Store, parts) -> None:
    for i, (tokens, ptr, rows, choice) in enumerate(parts):
        arrays = fuse.pack(tokens, ptr, rows, choice, VOCAB)
        shards.write_shard(store, "fuse", "train", i, arrays, "bench", rows=rows.rows)
    shards.commit_part(store, "fuse", "train", len(parts), "bench")


def open_reader(store: Store) -> PackedReader:
    return PackedReader(
        store, batch_size=BATCH, seed=0, bos=1, pad=0, width=VOCAB, candidates=4, lanes=2, config_hash="bench"
    )


def reader_rate(store: Store, steps: int) -> tuple[float, float]:
    """(blocks per second after the first batch, seconds to the first batch)."""
    start = time.perf_counter()
    reader = open_reader(store)
    next(reader)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        next(reader)
    rate = steps * BATCH / (time.perf_counter() - start)
    reader.close()
    return rate, first


def trainer_rate(store: Store, steps: int) -> float:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusion.loss import fusion_loss

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reader = open_reader(store)
    batches = [next(reader) for _ in range(steps + 1)]
    reader.close()
    start = None
    for i, b in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        logits = model(input_ids=b.inputs, attention_mask=b.mask).logits[:, :-1]
        out = fusion_loss(logits, b.labels, b.teacher_ids, b.teacher_logprobs, b.teacher_tail, lam=0.9)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=64, help="blocks per shard")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--trainer-steps", type=int, default=3)
    args = parser.parse_args()

    from tests.s3 import start_moto

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server, endpoint = start_moto()
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-reader")
    parts = [packed_shard(i, args.blocks) for i in range(args.shards)]
    tmp = tempfile.TemporaryDirectory()
    local = Store(tmp.name)
    s3 = Store("s3://bench-reader/run", StoreOptionsSpec(endpoint_url=endpoint))
    write_packed(local, parts)
    write_packed(s3, parts)
    record = shards.read_record(local, "fuse", "train", 0)
    first = {}
    rates = {}
    rates["reader_local"], first["reader_local"] = reader_rate(local, args.steps)
    rates["reader_s3"], first["reader_s3"] = reader_rate(s3, args.steps)
    rates["trainer_cpu"] = trainer_rate(local, args.trainer_steps)
    server.stop()
    print(
        json.dumps(
            {
                "blocks": args.shards * args.blocks,
                "block_tokens": LENGTH,
                "batch": BATCH,
                "packed_bytes_per_token": round(record["stored_bytes"] / record["rows"], 2),
                "torch_threads": torch.get_num_threads(),
                "blocks_per_second": {k: round(v, 2) for k, v in rates.items()},
                "seconds_to_first_batch": {k: round(v, 3) for k, v in first.items()},
                "reader_local_over_trainer_cpu": round(rates["reader_local"] / rates["trainer_cpu"], 1),
                "reader_s3_over_trainer_cpu": round(rates["reader_s3"] / rates["trainer_cpu"], 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
