"""Stored bytes per token on real text: logits of every model, aligned sources, packed set.

    python bench/bench_bytes.py [--chars 150000] [--store DIR] [--top-k 10] [--continuations 4,0] [--methods]

Runs split, vocab, logits, align and fuse of a run with a Llama-2-vocabulary target and three
sources with the GPT-NeoX-20B, GPT-2 and OpenLLaMA vocabularies (bench/realtext.py: tiny
models with real tokenizers, briefly trained), on held-out real text (the last `--chars`
characters of each corpus in ../shared/assets), then reads the commit records: bytes per
token per part, and per stored array, once per `logits.continuations` value (continuation rows
at byte boundaries inside tokens, fusion/continuations.py; 0: none), with the alignment's
coverage for each. As the cross-check with the entropy of a fully trained
model, the logits of stories260K (a real 512-token Llama) are measured the same way.

Prints JSON. The original FuseLLM stores ~112 B/token for a model's own top-10, ~168 per
aligned source and ~450 for the packed 3-source set (../shared/reference/NOTES.md).

`--methods` measures instead the logits stage's two methods side by side (`logits.method`:
top-k and sampled, the same k entries per token) on the same blocks of stories260K, a fully
trained model with its own tokenizer: bytes per token of both, their ratio, bytes per array.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import realtext  # noqa: E402

from fusion import scoring, shards  # noqa: E402
from fusion.config import parse_spec  # noqa: E402
from fusion.launch_local import run_all  # noqa: E402
from fusion.pipeline import open_run  # noqa: E402
from fusion.run import Run  # noqa: E402

SOURCES = ["src-neox", "src-gpt2", "src-openllama"]


def per_array(run: Run, stage: str, part: str) -> dict[str, float]:
    """Bytes per row of each stored array (its objects, metadata included), summed over shards."""
    sizes, rows = defaultdict(int), 0
    for name in run.store.list(shards.part_dir(stage, part)):
        if name.startswith("shard-") and name.endswith(".json"):
            record = run.store.read_json(f"{shards.part_dir(stage, part)}/{name}")
            rows += record["rows"]
            for key, size in record["objects"].items():
                sizes[key.split("/", 1)[0] if "/" in key else "(group)"] += size
    return {k: round(v / max(rows, 1), 3) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def padding_share(run: Run, part: str) -> float:
    """Share of the forward passes' positions that were padding (blocks batched by length)."""
    from fusion.stages import logits

    real = padded = 0
    for i in range(logits.shard_count(run, part)):
        lengths = np.diff(logits.read(run, part, i, ["seq_ptr"])["seq_ptr"]).tolist()
        for batch in scoring.length_batches(lengths, run.spec.logits.batch_tokens):
            real += sum(lengths[j] + 1 for j in batch)
            padded += (max(lengths[j] for j in batch) + 1) * len(batch)
    return round(1 - real / padded, 4)


def measure(run: Run, stage: str, part: str) -> dict:
    s = shards.part_status(run.store, stage, part)
    per_token = round(s.stored_bytes / max(s.rows, 1), 2)
    arrays = per_array(run, stage, part)
    return {"tokens": s.rows, "bytes": s.stored_bytes, "bytes_per_token": per_token, "arrays": arrays}


def compare_methods(root: Path, corpus: Path, top_k: int) -> dict:
    """Bytes per token of the logits stage with each method (and top-k without continuation
    rows), on the same blocks, for stories260K (a fully trained model with its own tokenizer;
    needs no model built here)."""
    report: dict = {"top_k": top_k, "model": "stories260K"}
    stories = {"path": str(realtext.ASSETS / "model-stories260K-llama" / "hf")}
    for method, m in (("top-k", 4), ("sampled", 4), ("top-k", 0)):
        key = method if m else f"{method}, no continuation rows"
        spec = {
            "name": "methods",
            "store": str(root / f"{method}-{m}"),
            "models": {"target": {"name": "stories", **stories}, "sources": [{"name": "stories-source", **stories}]},
            "corpus": {"path": str(corpus), "domain_field": "domain", "heldout_fraction": 0.0},
            "split": {"block_tokens": 500, "shard_blocks": 64},
            "logits": {"top_k": top_k, "method": method, "continuations": m},
        }
        run = open_run(parse_spec(spec))
        run_all(run, ["split", "logits"])
        report[key] = measure(run, "logits", "stories")
    report["sampled_over_top_k"] = round(report["sampled"]["bytes_per_token"] / report["top-k"]["bytes_per_token"], 4)
    report["continuation_rows_over_none"] = round(
        report["top-k"]["bytes_per_token"] / report["top-k, no continuation rows"]["bytes_per_token"], 4)
    return report


def measure_run(store: Path, corpus: Path, top_k: int, m: int) -> dict:
    spec = realtext.spec(str(store), corpus, SOURCES, top_k=top_k, continuations=m)
    run = open_run(parse_spec(spec))
    run_all(run, ["split", "vocab", "logits", "align", "fuse"])
    report = {"logits": {}, "align": {}, "fuse": {}}
    for name in ["target", *SOURCES]:
        report["logits"][name] = measure(run, "logits", name)
        report["logits"][name]["padding_share"] = padding_share(run, name)
    for s in SOURCES:
        report["align"][s] = measure(run, "align", s)
        report["align"][s]["coverage"] = [
            run.store.read_json(shards.record_path("align", s, i))["attrs"].get("coverage")
            for i in range(len(shards.committed_indices(run.store, "align", s)))
        ]
    report["fuse"]["train"] = measure(run, "fuse", "train")
    target_tokens = report["logits"]["target"]["tokens"]
    everything = report["logits"]["target"]["bytes"] + sum(report["align"][s]["bytes"] for s in SOURCES)
    report["all_candidates_bytes_per_target_token"] = round(everything / target_tokens, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=150_000, help="characters of held-out text per corpus")
    parser.add_argument("--store", help="store folder (default: a temporary one)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--continuations", default="4,0", help="logits.continuations values to measure, comma-separated")
    parser.add_argument("--methods", action="store_true", help="compare the logits methods top-k and sampled")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.store or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    corpus = realtext.write_corpus(root / "corpus.jsonl", args.chars)
    if args.methods:
        print(json.dumps(compare_methods(root, corpus, args.top_k), indent=1))
        return
    report = {"top_k": args.top_k, "corpus_chars": 2 * args.chars}
    for m in [int(x) for x in args.continuations.split(",")]:
        report[f"continuations={m}"] = measure_run(root / f"run-c{m}", corpus, args.top_k, m)

    # the cross-check: a fully trained model's entropy (stories260K, 512-token vocabulary)
    stories = realtext.ASSETS / "model-stories260K-llama" / "hf"
    check = realtext.spec(str(root / "stories"), corpus, ["src-neox"], block_tokens=500, top_k=args.top_k)
    check["models"]["target"] = {"name": "stories", "path": str(stories)}
    check_run = open_run(parse_spec(check))
    run_all(check_run, ["split", "logits"])
    report["logits_stories260K"] = measure(check_run, "logits", "stories")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
