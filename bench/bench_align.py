"""Alignment speed, side by side in one run: compiled vs the plain-Python baseline, per mode.

On the alignment fixture's 20 sequences (2048 Mistral tokens each, GPT-2 source):
- target tokens / s per core (CPU time of this single-threaded process) for reference-hard,
  reference-soft and default through align_blocks (text check included), and for the
  paper-convention kernel alone (what `align-fixture` times); the plain-Python baseline
  (tests/baseline_align.py: full DTW matrix, one cell at a time, editdistance for the cost) on
  the first few sequences, its output compared with ours;
- vocabulary maps 50k x 32k (GPT-2 -> Mistral, GPT-NeoX -> Llama-2), cold cache, wall time with
  all cores (the original: 827 s on 2 processes);
- align_blocks_parallel with 1 and 2 workers on the fixture repeated 16 times (wall time;
  meaningless on a machine other jobs keep busy), and the share of single-thread time spent in compiled code that releases the GIL
  with the speedup on 2 cores it allows (Amdahl); peak RSS.

    python bench/bench_align.py [--baseline-sequences 2] > bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusion.align import align_blocks, align_blocks_parallel, token_view, vocab_map  # noqa: E402
from fusion.align.fixture import _columns, _view  # noqa: E402
from fusion.align.reference import align_reference, first_token_match  # noqa: E402
from tests import baseline_align  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def fixture_blocks(folder: Path):
    """The fixture's sequences as align_blocks input: texts from the bytes the base tokens stand
    for (the fixture stores ids only), the source's fp16 logits as log-probabilities over its top-k."""
    base, blend = _view(folder / "tokenizers", "base"), _view(folder / "tokenizers", "blend")
    inputs = np.load(folder / "inputs.npz")
    n = json.loads((folder / "meta.json").read_text())["n_sequences"]
    seqs = [{key: inputs[f"{key}_{k:02d}"] for key in ("base_ids", "blend_ids", "topk_idx", "topk_logits")}
            for k in range(n)]
    texts = []
    for seq in seqs:
        stream = base.stream(seq["base_ids"])
        texts.append(stream[1:].decode("utf-8") if stream.startswith(b" ") else stream.decode("utf-8"))
    logits = np.concatenate([s["topk_logits"] for s in seqs]).astype(np.float64)
    top = logits.max(1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return base, blend, seqs, {
        "texts": texts,
        "target_tokens": np.concatenate([s["base_ids"] for s in seqs]).astype(np.int64),
        "target_ptr": np.cumsum([0] + [len(s["base_ids"]) for s in seqs]),
        "source_tokens": np.concatenate([s["blend_ids"] for s in seqs]).astype(np.int64),
        "source_ptr": np.cumsum([0] + [len(s["blend_ids"]) for s in seqs]),
        "source_topk_ids": np.concatenate([s["topk_idx"] for s in seqs]).astype(np.int64),
        "source_topk_logprobs": logprobs.astype(np.float32),
        "source_tail": np.zeros(len(logits), np.float32),
    }


def tiled(blocks: dict, times: int) -> dict:
    """The fixture's blocks repeated `times` times, as one input."""
    out = {"texts": list(blocks["texts"]) * times}
    for side in ("target", "source"):
        tokens, ptr = blocks[f"{side}_tokens"], np.asarray(blocks[f"{side}_ptr"])
        out[f"{side}_tokens"] = np.tile(tokens, times)
        out[f"{side}_ptr"] = np.concatenate([[0]] + [ptr[1:] + i * ptr[-1] for i in range(times)])
    for name in ("source_topk_ids", "source_topk_logprobs", "source_tail"):
        value = np.asarray(blocks[name])
        out[name] = np.concatenate([value] * times)
    return out


def api_args(blocks, base, blend, mapping, mode):
    return (blocks["texts"], blocks["target_tokens"], blocks["target_ptr"], blocks["source_tokens"],
            blocks["source_ptr"], blocks["source_topk_ids"], blocks["source_topk_logprobs"], blocks["source_tail"],
            base, blend, mapping, mode)


def paper_kernel(base, blend, seqs, hard, soft, mapping_strings):
    """The paper-convention kernel on every sequence (what align_fixture runs)."""
    translate = hard if soft is None else soft
    out = []
    for seq in seqs:
        b_ids, a_ids = seq["base_ids"].astype(np.int64), seq["blend_ids"].astype(np.int64)
        first, last = _columns(base, blend, b_ids, a_ids)

        def first_match_of(count, row_of, a_ids=a_ids, b_ids=b_ids):
            return first_token_match(blend.strings[a_ids[row_of[0]]], base.strings[b_ids[0]], "Ġ", "▁", True,
                                     None if soft is None else mapping_strings.get)

        out.append(align_reference(a_ids, b_ids, blend.stripped_codepoints, base.stripped_codepoints, first, last,
                                   hard, translate, translate, base.canonical, first_match_of,
                                   seq["topk_idx"].astype(np.int64), seq["topk_logits"].astype(np.float64)))
    return out


def baseline_reference(base, blend, seqs, mapping_strings, soft: bool):
    return [baseline_align.reference_rows(blend.strings, base.strings, seq["blend_ids"].tolist(),
                                          seq["base_ids"].tolist(), seq["topk_idx"].tolist(),
                                          seq["topk_logits"].astype(np.float64).tolist(), "Ġ", "▁", base.vocab,
                                          soft=mapping_strings if soft else None)
            for seq in seqs]


def same_rows(ours, theirs) -> bool:
    for (ptr, idx, val, _), rows in zip(ours, theirs):
        for j, row in enumerate(rows):
            if list(zip(idx[ptr[j] : ptr[j + 1]].tolist(), val[ptr[j] : ptr[j + 1]].tolist())) != row:
                return False
    return True


def baseline_default(base, blend, blocks, direct, count):
    from fusion.align.vocab import first_token

    vocab_bytes = [blend.token_bytes(x) for x in range(blend.size)]
    first = first_token(base)
    t_ptr, s_ptr = blocks["target_ptr"], blocks["source_ptr"]
    for b in range(count):
        t = blocks["target_tokens"][t_ptr[b] : t_ptr[b + 1]]
        s = blocks["source_tokens"][s_ptr[b] : s_ptr[b + 1]]
        baseline_align.default_rows(blocks["texts"][b].encode(), [base.token_bytes(x) for x in t],
                                    [blend.token_bytes(x) for x in s],
                                    blocks["source_topk_ids"][s_ptr[b] : s_ptr[b + 1]],
                                    blocks["source_topk_logprobs"][s_ptr[b] : s_ptr[b + 1]],
                                    blocks["source_tail"][s_ptr[b] : s_ptr[b + 1]], vocab_bytes, direct, first)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-sequences", type=int, default=2, help="fixture sequences the Python baseline runs")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each compiled run (best kept)")
    args = parser.parse_args()
    folder = SHARED / "reference" / "alignment-fixture"
    result = {"machine": {"cpus": os.cpu_count()}}
    cache = tempfile.mkdtemp(prefix="fusion-bench-cache-")
    os.environ["FUSION_CACHE_DIR"] = cache

    base, blend, seqs, blocks = fixture_blocks(folder)
    tokens = int(blocks["target_ptr"][-1])
    mapping_strings = json.loads((folder / "vocab_mapping_default.json").read_text())
    hard = np.array([base.vocab.get(s.replace("Ġ", "▁"), -1) for s in blend.strings], np.int32)
    soft = np.array([base.vocab[mapping_strings[s.replace("Ġ", "▁")]] for s in blend.strings], np.int32)
    maps = {"reference-hard": hard, "reference-soft": soft, "default": vocab_map(blend, base, "default")}

    log("compiling / warming up ...")
    for mode, mapping in maps.items():
        align_blocks(*api_args(blocks, base, blend, mapping, mode))
    paper_kernel(base, blend, seqs[:1], hard, None, mapping_strings)

    speed = {}
    for mode, mapping in maps.items():
        runs = [timed(align_blocks, *api_args(blocks, base, blend, mapping, mode)) for _ in range(args.repeat)]
        _, wall, cpu = min(runs, key=lambda r: r[2])
        speed[mode] = {"tokens_per_s_per_core": round(tokens / cpu), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
    for name, soft_map in (("paper-kernel-hard", None), ("paper-kernel-soft", soft)):
        runs = [timed(paper_kernel, base, blend, seqs, hard, soft_map, mapping_strings) for _ in range(args.repeat)]
        _, wall, cpu = min(runs, key=lambda r: r[2])
        speed[name] = {"tokens_per_s_per_core": round(tokens / cpu), "cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}

    few = seqs[: args.baseline_sequences]
    few_tokens = sum(len(s["base_ids"]) for s in few)
    log(f"plain-Python baseline on {len(few)} sequences ...")
    for mode, soft_map in (("reference-hard", None), ("reference-soft", soft)):
        theirs, wall, cpu = timed(baseline_reference, base, blend, few, mapping_strings, soft_map is not None)
        ours = paper_kernel(base, blend, few, hard, soft_map, mapping_strings)
        speed[mode]["python_baseline_tokens_per_s"] = round(few_tokens / cpu)
        speed[mode]["speedup_vs_baseline"] = round(speed[mode]["tokens_per_s_per_core"] / (few_tokens / cpu), 1)
        speed[mode]["baseline_output_identical"] = same_rows(ours, theirs)
    _, wall, cpu = timed(baseline_default, base, blend, blocks, maps["default"], len(few))
    speed["default"]["python_baseline_tokens_per_s"] = round(few_tokens / cpu)
    speed["default"]["speedup_vs_baseline"] = round(speed["default"]["tokens_per_s_per_core"] / (few_tokens / cpu), 1)
    result["fixture_20x2048"] = speed

    log("vocabulary maps (cold cache) ...")
    from transformers import AutoTokenizer

    views = {n: token_view(AutoTokenizer.from_pretrained(SHARED / "assets" / f"tok-{n}"), n)
             for n in ("gpt2", "mistral-7b-v0.1", "gpt-neox-20b", "llama2")}
    vocab = {}
    for source, target in (("gpt2", "mistral-7b-v0.1"), ("gpt-neox-20b", "llama2")):
        for mode in ("reference-soft", "default", "reference-hard"):
            _, wall, cpu = timed(vocab_map, views[source], views[target], mode)
            vocab[f"{source}->{target} {mode}"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                                    "pairs": views[source].size * views[target].size}
    result["vocab_map"] = vocab
    result["vocab_map_original_s"] = 827

    log("GIL-free share ...")
    import cProfile
    import pstats

    compiled = {"default_blocks", "reference_blocks", "block_prefixes", "block_starts", "_compact"}
    for mode, mapping in maps.items():
        profile = cProfile.Profile()
        profile.enable()
        align_blocks(*api_args(blocks, base, blend, mapping, mode))
        profile.disable()
        stats = pstats.Stats(profile).stats
        total = sum(entry[2] for entry in stats.values())
        free = sum(entry[2] for (_, _, name), entry in stats.items() if name in compiled)
        speed[mode]["gil_free_share"] = round(free / total, 3)
        speed[mode]["amdahl_bound_2_workers"] = round(1 / ((1 - free / total) + free / total / 2), 2)

    log("workers ...")
    big = tiled(blocks, 16)  # a stage-sized input (655k target tokens): thread start-up is noise
    big_tokens = int(big["target_ptr"][-1])
    scaling = {"load_average": open("/proc/loadavg").read().split()[0]}
    for mode, mapping in maps.items():
        row = {}
        for workers in (1, 2):
            runs = [timed(align_blocks_parallel, *api_args(big, base, blend, mapping, mode), workers=workers)
                    for _ in range(args.repeat)]
            row[f"{workers}_workers_tokens_per_s"] = round(big_tokens / min(r[1] for r in runs))
        row["speedup"] = round(row["2_workers_tokens_per_s"] / row["1_workers_tokens_per_s"], 2)
        scaling[mode] = row
    result["workers"] = scaling
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
