"""Vocabulary maps from and to a 151k byte-level vocabulary (Qwen3): wall seconds, CPU seconds and
peak memory per ordered pair and mode, each built from scratch (empty map cache) in a fresh
process, the default mode with its continuation and dummy-prefix tables. Compiled code comes from
numba's cache (run once before, e.g. by the tests; `--cold` empties it per map to time the
compilation too). On a sample, the default map's compiled byte trie against the plain-Python
FirstToken rule (same answers required), as a ratio.

    python bench/bench_vocab.py [--pairs qwen3:llama2,llama2:qwen3] [--sample 2000] [--out FILE]

Writes bench/results/vocab_151k.json (or --out) and prints a table. CPU seconds are summed over
threads: on a busy machine they are closer to what the map costs than wall seconds (both are
given, with the load average at the start and end).
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

OTHERS = ["llama2", "mistral-7b-v0.1", "openllama-v1", "gpt2", "gpt-neox-20b", "stories260K"]
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
    """The byte trie against the plain FirstToken rule on a sample (same answers required)."""
    import numpy as np

    from fusion.align.vocab import FirstToken, byte_trie

    s, t = load(source), load(target)
    rng = np.random.default_rng(0)
    ids = rng.choice(np.flatnonzero(s.lengths > 0), min(sample, int((s.lengths > 0).sum())), replace=False)
    trie = byte_trie(t)
    trie.firsts(s.data, s.ptr[ids[:4]], s.ptr[ids[:4] + 1])  # compile (or load the compiled code) first
    start = time.process_time()
    fast = trie.firsts(s.data, s.ptr[ids], s.ptr[ids + 1])
    fast_s = time.process_time() - start
    first = FirstToken(t)
    start = time.process_time()
    slow = [first(s.token_bytes(int(x))) for x in ids]
    slow_s = time.process_time() - start
    return {"trie_same": bool(all(max(a, -1) == b for a, b in zip(fast.tolist(), slow))),
            "trie_speedup": round(slow_s / max(fast_s, 1e-9), 1)}


def table(rows: list[dict], modes: list[str]) -> str:
    """Markdown: a row per pair, wall s / CPU s / peak RSS MB per mode."""
    lines = ["| source -> target | " + " | ".join(f"{m}: wall s / CPU s / peak MB" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for row in rows:
        cells = [f"{row[m]['wall_s']} / {row[m]['cpu_s']} / {row[m]['peak_rss_mb']}" for m in modes]
        lines.append(f"| {row['source']} -> {row['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(f"{a}:{b}" for o in OTHERS for a, b in (("qwen3", o), (o, "qwen3"))),
                        help="source:target,...")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sample", type=int, default=2000, help="tokens per pair for the trie's ratio (0: none)")
    parser.add_argument("--cold", action="store_true", help="compile numba code afresh for every map")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vocab_151k.json")
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
                if args.cold:
                    env["NUMBA_CACHE_DIR"] = str(Path(cache) / "numba")
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
    modes = args.modes.split(",")
    result = {"load_average_start": load_start, "load_average_end": os.getloadavg()[0], "cores": os.cpu_count(),
              "numba_cache": "cold" if args.cold else "warm", "pairs": rows, "table": table(rows, modes)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    print(f"load average {result['load_average_start']:.1f} -> {result['load_average_end']:.1f}"
          f" on {os.cpu_count()} cores; written to {args.out}")


if __name__ == "__main__":
    main()
