"""Vocabulary maps from and to a 151k byte-level vocabulary (Qwen3): time and peak memory per
ordered pair and mode, each built from scratch (empty map cache) in a fresh process, with the
default mode's continuation and dummy-prefix tables. Against a baseline in the same run, as
ratios, on a sample: reference-soft's nearest-string search with and without the search through
shared characters (the search by length alone is the one it replaced; both must agree), and the
default map's compiled byte trie against the plain-Python FirstToken rule.

    python bench/bench_vocab.py [--pairs qwen3:llama2,llama2:qwen3] [--sample 2000] > vocab.json

CPU seconds are summed over threads: on a busy machine they are closer to what the map costs
than wall seconds (both are printed, with the load average at the start and end).
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
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OTHERS = ["llama2", "mistral-7b-v0.1", "openllama-v1", "gpt2", "gpt-neox-20b"]
MODES = ["default", "reference-hard", "reference-soft"]


def load(name):
    from transformers import AutoTokenizer

    from fusion.align import token_view

    path = SHARED / "assets" / ("model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}")
    return token_view(AutoTokenizer.from_pretrained(path), name)


def one(source: str, target: str, mode: str) -> dict:
    """Run in a fresh process: build one map (and the default mode's tables) from scratch."""
    import resource

    import numpy as np

    from fusion.align import vocab_map
    from fusion.align.vocab import continuation_table, dummy_prefix_table

    s, t = load(source), load(target)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    mapping = vocab_map(s, t, mode)
    if mode == "default":
        continuation_table(s, t)
        dummy_prefix_table(s, t)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"source": source, "target": target, "mode": mode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": peak // 1024, "peak_rss_growth_mb": (peak - before) // 1024,
            "mapped_share": round(float(np.mean(mapping >= 0)), 4)}


def baselines(source: str, target: str, sample: int) -> dict:
    """Sampled ratios against the searches this code replaced (same answers required)."""
    import numpy as np

    from fusion.align.vocab import FirstToken, byte_trie, nearest_strings, spelled_as_target

    s, t = load(source), load(target)
    rng = np.random.default_rng(0)
    spelled = spelled_as_target(s, t)
    misses = [x for x in spelled if x and x not in t.vocab]
    queries = [misses[i] for i in rng.choice(len(misses), min(sample, len(misses)), replace=False)]
    nearest_strings(queries[:4], t.strings)  # compile (or load the compiled code) first
    nearest_strings(queries[:4], t.strings, shared_search=False)
    start = time.process_time()
    new = nearest_strings(queries, t.strings)
    new_s = time.process_time() - start
    start = time.process_time()
    old = nearest_strings(queries, t.strings, shared_search=False)
    old_s = time.process_time() - start
    ids = rng.choice(np.flatnonzero(s.lengths > 0), min(sample, int((s.lengths > 0).sum())), replace=False)
    trie = byte_trie(t)
    trie.firsts(s.data, s.ptr[ids[:4]], s.ptr[ids[:4] + 1])
    start = time.process_time()
    fast = trie.firsts(s.data, s.ptr[ids], s.ptr[ids + 1])
    fast_s = time.process_time() - start
    first = FirstToken(t)
    start = time.process_time()
    slow = [first(s.token_bytes(int(x))) for x in ids]
    slow_s = time.process_time() - start
    return {"soft_misses": len(misses), "soft_sample": len(queries), "soft_same": bool((new == old).all()),
            "soft_speedup": round(old_s / max(new_s, 1e-9), 1),
            "trie_same": bool(all(max(a, -1) == b for a, b in zip(fast.tolist(), slow))),
            "trie_speedup": round(slow_s / max(fast_s, 1e-9), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(f"{a}:{b}" for o in OTHERS for a, b in (("qwen3", o), (o, "qwen3"))),
                        help="source:target,...")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sample", type=int, default=2000, help="queries per pair for the baseline ratios")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one.split(":"))))
        return
    load_start = os.getloadavg()[0]
    rows = []
    for pair in args.pairs.split(","):
        source, target = pair.split(":")
        row = {"source": source, "target": target}
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "FUSION_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--one", f"{source}:{target}:{mode}"], env=env,
                                     check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            row[mode] = {k: result[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "peak_rss_growth_mb", "mapped_share")}
            print(f"{source:>16} -> {target:<16} {mode:<15} wall {result['wall_s']:6.1f} s  cpu {result['cpu_s']:6.1f} s"
                  f"  peak {result['peak_rss_mb']} MB", file=sys.stderr, flush=True)
        if args.sample:
            row["baseline"] = baselines(source, target, args.sample)
            print(f"{'':>36} baseline {row['baseline']}", file=sys.stderr, flush=True)
        rows.append(row)
    print(json.dumps({"load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                      "cores": os.cpu_count(), "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
