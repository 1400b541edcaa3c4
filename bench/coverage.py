"""Coverage: the share of target rows that receive a source distribution, for every ordered pair
of the real tokenizers (Qwen3's 151k byte-level one and stories260K's normalizing one included),
per mode, on real text windows of each corpus: both shared corpora and code (this Python's
standard library, the tiny corpus's code documents).

The source rows are captured by the logits stage's own code (fusion/scoring.py: top-k and tail;
fusion/continuations.py: the continuation rows at byte boundaries inside each real token), from
one of two kinds of teacher (--teacher):

- synthetic: random logits (normal, scale 2.5) over the whole vocabulary, the real next token
  raised above every other in a share --hit of the rows (default 0.8, about what a good model's
  top-10 holds) and left where it falls in the others;
- model: real trained models as the sources: the tiny example's two sources (`tiny:src-llama`,
  a SentencePiece Llama, and `tiny:src-neox`, a byte-level GPT-NeoX, both with 2,048-token
  vocabularies trained on this Python's standard library; fusion/tiny.py) and stories260K (the
  real pretrained 512-token Llama), each teaching every tokenizer of the list as the target.

Columns: the default mode as the pipeline runs it (with continuation rows), the default mode
from the top-k alone (logits.continuations: 0), and the reference modes (whose coverage does not
depend on the rows' ids; a reference row counts as covered only with a source distribution, not
its one-hot fallback).

    python bench/coverage.py [--teacher synthetic|model] [--windows 12] [--chars 3000] [--out coverage.json]
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fusion.align import align_blocks, token_view, vocab_map  # noqa: E402
from fusion.sparse import SparseRows  # noqa: E402

NAMES = ["llama2", "mistral-7b-v0.1", "openllama-v1", "gpt2", "gpt-neox-20b", "qwen3", "stories260K"]
CORPORA = {"sotu": SHARED / "assets" / "corpus-sotu-en" / "sotu.txt",
           "python-docs": SHARED / "assets" / "corpus-python311-docs-en" / "python311_docs.txt",
           "code": None}
MODES = ["default", "default-top-k-only", "reference-hard", "reference-soft"]
K, M = 10, 4  # the logits stage's defaults: logits.top_k, logits.continuations


def corpus_text(name: str) -> str:
    if CORPORA[name] is not None:
        return CORPORA[name].read_text(encoding="utf-8")
    from fusion import tiny

    return "\n\n".join(text for text, domain in tiny.corpus_documents("python-stdlib") if domain == "code")


def windows(corpus: str, count: int, chars: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    text = corpus_text(corpus)
    return [text[start : start + chars] for start in rng.integers(0, len(text) - chars, count)]


# ---- teachers -------------------------------------------------------------------------------------
def synthetic_capture(view, tokens: np.ndarray, hit: float, seed: int):
    """Top-k and continuation rows of random logits, the real token on top in a share `hit` of rows."""
    import torch

    from fusion.continuations import OnDevice, continuation_rows, prefix_ranges
    from fusion.scoring import top_k_rows

    ranges = OnDevice(prefix_ranges(view), "cpu")
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for a in range(0, len(tokens), 256):
        real = torch.as_tensor(tokens[a : a + 256])
        logits = torch.randn((len(real), view.size), generator=gen) * 2.5
        raised = torch.rand(len(real), generator=gen) < hit
        top = logits.max(dim=1).values + 1.0
        logits[torch.arange(len(real)), real] = torch.where(raised, top, logits[torch.arange(len(real)), real])
        parts.append(top_k_rows(logits, real, K)[:3] + continuation_rows(logits, real, ranges, M))
    return [torch.cat(p).numpy() for p in zip(*parts)]


TINY_SOURCES = ["tiny:src-llama", "tiny:src-neox"]


def tokenizer_path(name: str) -> Path:
    if name.startswith("tiny:"):
        from fusion import tiny

        return tiny.model_path(name.removeprefix("tiny:"))
    return SHARED / "assets" / ("model-stories260K-llama/hf" if name == "stories260K" else f"tok-{name}")


def model_capture(name: str, view, tokenizer, blocks: list[list[int]]):
    """Top-k and continuation rows of a real model over the blocks (the logits stage's scorer)."""
    from transformers import AutoModelForCausalLM

    from fusion.continuations import prefix_ranges
    from fusion.scoring import TopK, score_blocks

    model = AutoModelForCausalLM.from_pretrained(tokenizer_path(name)).eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id  # as the logits stage
    results = score_blocks(TopK(model, K, "cpu", (prefix_ranges(view), M)), blocks, bos, 4096)
    return [np.concatenate([r[f] for r in results]) for f in (0, 1, 2, 4, 5, 6, 7)]


# ---- the table ------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=["synthetic", "model"], default="synthetic")
    parser.add_argument("--windows", type=int, default=12, help="text windows per corpus")
    parser.add_argument("--chars", type=int, default=3000, help="characters per window")
    parser.add_argument("--hit", type=float, default=0.8, help="synthetic: share of rows whose top-k holds the real token")
    parser.add_argument("--out", help="write the JSON here (default: stdout, where imported libraries may also log)")
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--corpora", default=",".join(CORPORA))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    targets, modes = args.names.split(","), args.modes.split(",")
    sources = targets if args.teacher == "synthetic" else TINY_SOURCES + ["stories260K"]
    names = list(dict.fromkeys(targets + sources))
    toks = {n: AutoTokenizer.from_pretrained(tokenizer_path(n)) for n in names}
    views = {n: token_view(toks[n], n) for n in names}
    print(f"{'target':>16}    {'source':<16} {'corpus':<12}" + "".join(f" {m:>18}" for m in modes), file=sys.stderr)
    results = []
    for corpus in args.corpora.split(","):
        texts = windows(corpus, args.windows, args.chars, seed=0)
        encoded = {n: [toks[n].encode(t, add_special_tokens=False) for t in texts] for n in names}
        captured = {}
        for n in sources:
            flat = np.concatenate(encoded[n]).astype(np.int64)
            if args.teacher == "synthetic":
                captured[n] = synthetic_capture(views[n], flat, args.hit, seed=names.index(n))
            else:
                captured[n] = model_capture(n, views[n], toks[n], encoded[n])
        for target in targets:
            for source in sources:
                if target == source:
                    continue
                t = np.concatenate(encoded[target]).astype(np.int64)
                t_ptr = np.cumsum([0] + [len(x) for x in encoded[target]])
                s = np.concatenate(encoded[source]).astype(np.int64)
                s_ptr = np.cumsum([0] + [len(x) for x in encoded[source]])
                ids, logprobs, tail, depth, c_ids, c_lp, c_tail = captured[source]
                listed = c_ids >= 0
                cont = SparseRows(listed.sum(1), c_ids[listed], c_lp[listed].astype(np.float32),
                                  c_tail.astype(np.float32))
                row = {"target": target, "source": source, "corpus": corpus, "target_rows": int(len(t))}
                for mode in modes:
                    stats = {}
                    name = "default" if mode == "default-top-k-only" else mode
                    continuations = (depth, cont) if mode == "default" else None
                    align_blocks(texts, t, t_ptr, s, s_ptr, ids.astype(np.int64), logprobs.astype(np.float32),
                                 tail.astype(np.float32), views[target], views[source],
                                 vocab_map(views[source], views[target], name), name, stats, continuations)
                    row[mode] = round(stats["coverage"], 4)
                    if mode == "default":
                        row["default_how"] = {w: round(stats[w] / stats["rows"], 4)
                                              for w in ("shared", "conditioned", "continued", "dummy", "special")}
                results.append(row)
                print(f"{target:>16} <- {source:<16} {corpus:<12}" + "".join(f" {row[m]:18.2%}" for m in modes),
                      file=sys.stderr, flush=True)
    summary = {m: {"min": min(r[m] for r in results), "mean": round(float(np.mean([r[m] for r in results])), 4)}
               for m in modes}
    text = json.dumps({"teacher": args.teacher, "windows_per_corpus": args.windows, "chars_per_window": args.chars,
                      "k": K, "continuations": M, "hit": args.hit if args.teacher == "synthetic" else None,
                      "pairs": results, "summary": summary}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
