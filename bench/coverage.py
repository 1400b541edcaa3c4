"""Coverage: the share of target rows that receive a source distribution, for every ordered pair
of the five real tokenizers, per mode, on real text windows from both corpora.

Top-k rows are synthetic (seeded RNG): k = 10 random ids per source row, one of them the real
next source token in a share --hit of the rows (default 0.8, about what a good model's top-10
holds). The
reference modes' coverage does not depend on the ids; the default mode's does where a target
row's context ends inside a source token (the row is conditioned on the bytes committed so far
and needs a candidate that agrees with them), so it is also reported without those rows
("default, shared boundary only"), which depends on the tokenizations alone. A reference row
counts as covered only with a source distribution (its one-hot fallback rows do not).

    python bench/coverage.py [--windows 24] [--chars 3000] > coverage.json   (table on stderr)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusion.align import align_blocks, token_view, vocab_map  # noqa: E402

NAMES = ["llama2", "mistral-7b-v0.1", "openllama-v1", "gpt2", "gpt-neox-20b"]
CORPORA = [SHARED / "assets" / "corpus-sotu-en" / "sotu.txt",
           SHARED / "assets" / "corpus-python311-docs-en" / "python311_docs.txt"]
MODES = ["reference-hard", "reference-soft", "default"]


def windows(count: int, chars: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for corpus in CORPORA:
        text = corpus.read_text(encoding="utf-8")
        for start in rng.integers(0, len(text) - chars, count // len(CORPORA)):
            out.append(text[start : start + chars])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=24, help="text windows, half from each corpus")
    parser.add_argument("--chars", type=int, default=3000, help="characters per window")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hit", type=float, default=0.8, help="share of rows whose top-k holds the real next token")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    toks = {n: AutoTokenizer.from_pretrained(SHARED / "assets" / f"tok-{n}") for n in NAMES}
    views = {n: token_view(toks[n], n) for n in NAMES}
    texts = windows(args.windows, args.chars, seed=0)
    encoded = {n: [toks[n].encode(t, add_special_tokens=False) for t in texts] for n in NAMES}
    rng = np.random.default_rng(0)
    topk = {}
    for n in NAMES:
        flat = np.concatenate(encoded[n]).astype(np.int64)
        ids = rng.integers(0, views[n].size, (len(flat), args.k))
        hit = rng.random(len(flat)) < args.hit
        ids[hit, rng.integers(0, args.k, int(hit.sum()))] = flat[hit]
        probs = np.sort(rng.random((len(flat), args.k)), axis=1)[:, ::-1] + 0.05
        probs = 0.9 * probs / probs.sum(1, keepdims=True)
        topk[n] = (flat, ids, np.log(probs).astype(np.float32), np.full(len(flat), 0.1, np.float32))

    results = []
    for target in NAMES:
        for source in NAMES:
            if target == source:
                continue
            t = np.concatenate(encoded[target]).astype(np.int64)
            t_ptr = np.cumsum([0] + [len(x) for x in encoded[target]])
            s, ids, logprobs, tail = topk[source]
            s_ptr = np.cumsum([0] + [len(x) for x in encoded[source]])
            row = {"target": target, "source": source, "target_rows": int(len(t))}
            for mode in MODES:
                stats = {}
                mapping = vocab_map(views[source], views[target], mode)
                align_blocks(texts, t, t_ptr, s, s_ptr, ids, logprobs, tail, views[target], views[source], mapping,
                             mode, stats)
                row[mode] = round(stats["coverage"], 4)
                if mode == "default":
                    row["default_shared_boundary"] = round(stats["shared"] / stats["rows"], 4)
                    row["default_conditioned"] = round(stats["conditioned"] / stats["rows"], 4)
            results.append(row)
            print(f"{target:>16} <- {source:<16} " + "  ".join(f"{row[m]:7.2%}" for m in MODES)
                  + f"   {row['default_shared_boundary']:7.2%}", file=sys.stderr, flush=True)
    summary = {m: {"min": min(r[m] for r in results), "mean": round(float(np.mean([r[m] for r in results])), 4)}
               for m in MODES + ["default_shared_boundary"]}
    print(json.dumps({"windows": len(texts), "chars_per_window": args.chars, "k": args.k, "hit": args.hit,
                      "pairs": results,
                      "summary": summary}, indent=1))


if __name__ == "__main__":
    print(f"{'target':>16}    {'source':<16} {'ref-hard':>8} {'ref-soft':>8} {'default':>8}   shared-boundary-only",
          file=sys.stderr)
    main()
