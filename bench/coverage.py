"""Coverage: the share of target rows that receive a source distribution, for every ordered pair
of the real tokenizers (Qwen3's 151k byte-level one and stories260K's normalizing one included),
per mode, on real text windows of each corpus: both shared corpora and code (this Python's
standard library, the tiny corpus's code documents).

Top-k rows are synthetic (seeded RNG): k = 10 random ids per source row, one of them the real
next source token in a share --hit of the rows (default 0.8, about what a good model's top-10
holds). The
reference modes' coverage does not depend on the ids; the default mode's does where a target
row's context ends inside a source token (the row is conditioned on the bytes committed so far
and needs a candidate that agrees with them), so it is also reported without those rows
("default, shared boundary only"), which depends on the tokenizations alone. A reference row
counts as covered only with a source distribution (its one-hot fallback rows do not).

    python bench/coverage.py [--windows 12] [--chars 3000] [--names ...] [--modes ...] > coverage.json
    (table on stderr: one line per pair and corpus)
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

NAMES = ["llama2", "mistral-7b-v0.1", "openllama-v1", "gpt2", "gpt-neox-20b", "qwen3", "stories260K"]
CORPORA = {"sotu": SHARED / "assets" / "corpus-sotu-en" / "sotu.txt",
           "python-docs": SHARED / "assets" / "corpus-python311-docs-en" / "python311_docs.txt",
           "code": None}
MODES = ["reference-hard", "reference-soft", "default"]


def corpus_text(name: str) -> str:
    if CORPORA[name] is not None:
        return CORPORA[name].read_text(encoding="utf-8")
    from fusion import tiny

    return "\n\n".join(text for text, domain in tiny.corpus_documents("python-stdlib") if domain == "code")


def windows(corpus: str, count: int, chars: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    text = corpus_text(corpus)
    return [text[start : start + chars] for start in rng.integers(0, len(text) - chars, count)]


def tokenizer_path(name: str) -> Path:
    return SHARED / "assets" / ("model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=12, help="text windows per corpus")
    parser.add_argument("--chars", type=int, default=3000, help="characters per window")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hit", type=float, default=0.8, help="share of rows whose top-k holds the real next token")
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--corpora", default=",".join(CORPORA))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    names, modes = args.names.split(","), args.modes.split(",")
    toks = {n: AutoTokenizer.from_pretrained(tokenizer_path(n)) for n in names}
    views = {n: token_view(toks[n], n) for n in names}
    print(f"{'target':>16}    {'source':<16} {'corpus':<12}" + "".join(f" {m:>14}" for m in modes)
          + ("   shared-boundary-only" if "default" in modes else ""), file=sys.stderr)
    results = []
    for corpus in args.corpora.split(","):
        texts = windows(corpus, args.windows, args.chars, seed=0)
        encoded = {n: [toks[n].encode(t, add_special_tokens=False) for t in texts] for n in names}
        rng = np.random.default_rng(0)
        topk = {}
        for n in names:
            flat = np.concatenate(encoded[n]).astype(np.int64)
            ids = rng.integers(0, views[n].size, (len(flat), args.k))
            hit = rng.random(len(flat)) < args.hit
            ids[hit, rng.integers(0, args.k, int(hit.sum()))] = flat[hit]
            probs = np.sort(rng.random((len(flat), args.k)), axis=1)[:, ::-1] + 0.05
            probs = 0.9 * probs / probs.sum(1, keepdims=True)
            topk[n] = (flat, ids, np.log(probs).astype(np.float32), np.full(len(flat), 0.1, np.float32))
        for target in names:
            for source in names:
                if target == source:
                    continue
                t = np.concatenate(encoded[target]).astype(np.int64)
                t_ptr = np.cumsum([0] + [len(x) for x in encoded[target]])
                s, ids, logprobs, tail = topk[source]
                s_ptr = np.cumsum([0] + [len(x) for x in encoded[source]])
                row = {"target": target, "source": source, "corpus": corpus, "target_rows": int(len(t))}
                for mode in modes:
                    stats = {}
                    mapping = vocab_map(views[source], views[target], mode)
                    align_blocks(texts, t, t_ptr, s, s_ptr, ids, logprobs, tail, views[target], views[source],
                                 mapping, mode, stats)
                    row[mode] = round(stats["coverage"], 4)
                    if mode == "default":
                        row["default_shared_boundary"] = round(stats["shared"] / stats["rows"], 4)
                        row["default_conditioned"] = round(stats["conditioned"] / stats["rows"], 4)
                results.append(row)
                print(f"{target:>16} <- {source:<16} {corpus:<12}" + "".join(f" {row[m]:14.2%}" for m in modes)
                      + (f"   {row['default_shared_boundary']:7.2%}" if "default" in modes else ""),
                      file=sys.stderr, flush=True)
    keys = modes + (["default_shared_boundary"] if "default" in modes else [])
    summary = {m: {"min": min(r[m] for r in results), "mean": round(float(np.mean([r[m] for r in results])), 4)}
               for m in keys}
    print(json.dumps({"windows_per_corpus": args.windows, "chars_per_window": args.chars, "k": args.k,
                      "hit": args.hit, "pairs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
