"""Overhead of fusion training over CLM-only training: the same model, the same batches.

fusion: the trainer's own step (fusion/training: collate packed blocks with their sparse
        top-k teacher rows, forward, fusion_loss with lambda 0.9, backward, clip, AdamW step)
clm:    the same step with the teacher rows dropped and the loss a plain cross-entropy on the
        logits (what a Hugging Face model computes for `labels`)

Both variants alternate step by step in one process, so machine noise hits both alike.
Step time: the median per variant. Peak memory: before each step the kernel's resident-memory
high-water mark is reset (/proc/self/clear_refs), after it the mark is read; reported is its
maximum per variant minus the resident memory after imports, so it counts the model, optimizer
state, batch, activations and loss temporaries. Prints one JSON object; the goal is a ratio
fusion / clm of at most 1.05 for each.

    python bench/bench_train.py [--vocab 32000 --hidden 256 --layers 4 --seq 512 --batch 4 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args):
    """A randomly initialised Llama, packed-like blocks with top-k teacher rows, and a torch
    engine of the trainer around them."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusion.config import TrainSpec
    from fusion.sparse import SparseRows
    from fusion.stages import fuse
    from fusion.training import data, engine
    from fusion.training.distributed import World

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq + 1,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    model.config.use_cache = False
    spec = TrainSpec(batch_size=args.batch, lr=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    world = World(0, 1, 0, "cpu", False)
    eng = engine.TorchEngine(model, optimizer, scheduler, world, engine.batch_layout(spec, 1), "fp32", spec, 10**6)

    rng = np.random.default_rng(0)
    n, k, blocks = args.seq, args.top_k, args.batch * 2
    ids = np.stack([rng.choice(args.vocab, size=k, replace=False) for _ in range(n * blocks)])
    tail = rng.uniform(0.05, 0.3, size=n * blocks)
    lp = np.log(np.sort(rng.dirichlet(np.ones(k), size=n * blocks), axis=1)[:, ::-1] * (1 - tail[:, None]))
    rows = SparseRows.from_topk(ids, lp.astype(np.float32), tail.astype(np.float32))
    tokens = rng.integers(0, args.vocab, size=n * blocks)
    seq_ptr = np.arange(0, n * blocks + 1, n, dtype=np.int64)
    choice = np.arange(blocks) % 3
    # CLM-only training reads the same tokens and no teacher rows
    empty = np.zeros(0, np.float32)
    no_teacher = SparseRows(np.zeros(n * blocks, np.int32), np.zeros(0, np.int64), empty, np.zeros(n * blocks, np.float32))
    halves = [list(range(args.batch)), list(range(args.batch, blocks))]
    out = {}
    for kind, teacher in (("fusion", rows), ("clm", no_teacher)):  # through the fuse stage's encoder and decoder
        shard = data.Shard.from_decoded(0, fuse.decode(fuse.pack(tokens, seq_ptr, teacher, choice, args.vocab)))
        out[kind] = [[(shard, b) for b in half] for half in halves]
    return eng, out


def step(eng, blocks, kind: str, vocab: int) -> None:
    import torch

    from fusion.loss import fusion_loss
    from fusion.training import data, engine

    batch = SimpleNamespace(**data.collate(blocks, bos=1, pad=0, width=vocab, candidates=3))
    logits = eng.forward(batch)
    if kind == "fusion":
        teacher = (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail)
        out = fusion_loss(logits, batch.labels, *teacher, lam=0.9, reduction="sum")
        loss = out["loss"] / batch.tokens
    else:
        flat = logits.float().reshape(-1, vocab)
        loss = torch.nn.functional.cross_entropy(flat, batch.labels.reshape(-1), ignore_index=-100)
    eng.backward(loss, last=True)
    eng.step()


def resident_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers  # noqa: F401

    import fusion.loss  # noqa: F401
    import fusion.training.engine  # noqa: F401

    torch.set_num_threads(args.threads)
    base = resident_mb()
    eng, batches = build(args)
    times = {"clm": [], "fusion": []}
    peaks = {"clm": [], "fusion": []}
    for s in range(args.steps + 1):
        for kind in ("clm", "fusion") if s % 2 == 0 else ("fusion", "clm"):
            reset_peak()
            started = time.perf_counter()
            step(eng, batches[kind][s % 2], kind, args.vocab)
            elapsed = time.perf_counter() - started
            if s > 0:  # the first step of each warms up
                times[kind].append(elapsed)
                peaks[kind].append(resident_mb("VmHWM") - base)
    step_time = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in peaks.items()}

    report = {
        "device": "cpu (no GPU available for this measurement)",
        "threads": args.threads,
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                  "parameters_m": round(sum(p.numel() for p in eng.module.parameters()) / 1e6, 2)},
        "batch": {"sequences": args.batch, "tokens_per_sequence": args.seq, "teacher_top_k": args.top_k},
        "step_time_s": {k: round(v, 4) for k, v in step_time.items()},
        "step_time_all_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "time_ratio": round(step_time["fusion"] / step_time["clm"], 4),
        "peak_memory_mb": {k: round(v, 1) for k, v in peak.items()},
        "memory_ratio": round(peak["fusion"] / peak["clm"], 4),
        "goal_ratio": 1.05,
    }
    report["goal_met"] = {"time": report["time_ratio"] <= 1.05, "memory": report["memory_ratio"] <= 1.05}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
