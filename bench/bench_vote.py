"""Crowd voting against its members and the probability ensemble on held-out continuations.

    python bench/bench_vote.py --quick         # the replication's quick-scale models (minutes)
    python bench/bench_vote.py                 # its full-scale models (built first if absent)

The models are bench/replicate.py's (same work folder, built by the same code if absent): three
heterogeneous sources (GPT-2, Llama-2, GPT-NeoX tokenizers) and three experts (the target
fine-tuned per domain, one tokenizer). Held-out text of each domain is cut into consecutive
windows; each gives a prompt (`prompt_chars` characters, cut at a space) and a reference (the
next `continuation_chars` characters). Every system continues every prompt greedily; continuations are cut to the
reference's length in characters, then scored by ROUGE-L F1 against the real continuation, over
words and over characters:

    <model>                    one model alone
    vote-<crowd>-<similarity>  crowd voting (fusion/vote.py) among the crowd's candidates:
                               experts, sources, or all six; similarity rouge-l-word,
                               rouge-l-char, or embedding (mean last hidden state of the target)
    ensemble-experts           the probability ensemble of the experts (fusion/ensemble.py,
                               one vocabulary: generation needs one), greedy from the mixture
    oracle-<crowd>             the crowd's candidate closest to the reference: the ceiling of
                               any selection rule, not a method

Beside the scores, two diagnostics say whether a comparison means anything: the share of a
system's outputs that are degenerate (fewer than 3 distinct words: one word repeated, or only
spaces and newlines), and for each vote the share of prompts where two candidates tied for the
most agreement with different texts, so the rule picked the earlier member in the crowd's order.

Prints a table and, last, one JSON line, and writes the JSON to bench/results/vote[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate  # noqa: E402  (bench/replicate.py: data, models, scale)

from fusion.vote import SIMILARITIES, choose, load_voter, rouge_l_chars, rouge_l_words, words  # noqa: E402

FEW_WORDS = 3  # an output with fewer distinct words than this is degenerate (one word repeated, or only spaces)


def prompts(data: dict, domain: str, n: int, prompt_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from the domain's held-out pieces: consecutive windows of
    prompt_chars + continuation_chars characters, the prompt cut at a space."""
    out = []
    for piece in data[domain]["heldout"]:
        start = 0
        while start + prompt_chars + continuation_chars <= len(piece) and len(out) < n:
            window = piece[start : start + prompt_chars]
            cut = window.rfind(" ", prompt_chars // 2)
            cut = cut if cut > 0 else prompt_chars
            out.append((window[:cut], piece[start + cut : start + cut + continuation_chars]))
            start += prompt_chars + continuation_chars
    return out


def scores(candidate: str, reference: str) -> tuple[float, float, bool]:
    """Word and character ROUGE-L against the reference, and whether the candidate is degenerate."""
    degenerate = len(set(words(candidate))) < FEW_WORDS
    return rouge_l_words(candidate, reference), rouge_l_chars(candidate, reference), degenerate


def markdown(table: dict) -> str:
    """The results as a markdown table: word ROUGE-L per domain, the means, and the diagnostics."""
    lines = ["| system | sotu | docs | code | mean word ROUGE-L ± s.e. | mean char ROUGE-L | degenerate outputs "
             "| votes decided by member order | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system, row in table.items():
        m = row["mean"]
        tied = f"{m['tied']:.0%}" if "tied" in m else ""
        lines.append(f"| {system} | " + " | ".join(f"{row[d]['rouge_l_word']:.3f}" for d in replicate.DOMAINS)
                     + f" | {m['rouge_l_word']:.3f} ± {m['word_std_error']:.3f} | {m['rouge_l_char']:.3f} "
                     f"| {m['degenerate']:.0%} | {tied} | {m['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the replication's quick-scale models")
    parser.add_argument("--out", default=str(replicate.REPO / "runs" / "replicate"), help="the replication's work folder")
    parser.add_argument("--report", default=str(replicate.REPO / "bench" / "results"))
    parser.add_argument("--prompts", type=int, default=20, help="prompts per domain")
    parser.add_argument("--prompt-chars", type=int, default=300)
    parser.add_argument("--continuation-chars", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args(argv)
    if not replicate.ASSETS.is_dir():
        print(f"bench_vote: {replicate.ASSETS} is not present; this benchmark needs the shared assets", file=sys.stderr)
        return 2
    import torch

    from fusion.ensemble import Ensemble, load_member

    scale = replicate.QUICK if args.quick else replicate.Scale()
    out = Path(args.out + ("-quick" if args.quick else "")).resolve()
    started = time.perf_counter()
    data = replicate.prepare_data(scale)
    names = [*replicate.SOURCES, *replicate.EXPERTS]
    folders = {n: replicate.build_model(n, scale, data, out / "models") for n in ["target", *names]}
    voters = {n: load_voter(str(folders[n])) for n in names}
    embedder = load_voter(str(folders["target"]))
    ensemble = Ensemble([load_member(folders[n]) for n in replicate.EXPERTS])
    crowds = {"experts": replicate.EXPERTS, "sources": replicate.SOURCES, "all": names}

    results: dict[str, dict[str, list]] = {}  # system -> domain -> [(word, char, degenerate)] per prompt
    tied: dict[str, int] = {}  # vote -> prompts where different candidates shared the top score (the earlier won)
    seconds: dict[str, float] = {}

    def record(system: str, domain: str, candidate: str, reference: str) -> None:
        results.setdefault(system, {}).setdefault(domain, []).append(scores(candidate, reference))

    for domain in replicate.DOMAINS:
        for prompt, reference in prompts(data, domain, args.prompts, args.prompt_chars, args.continuation_chars):
            texts = {}
            for n, v in voters.items():
                t = time.perf_counter()
                texts[n] = v.continue_text(prompt, args.max_new_tokens, max_chars=len(reference))
                seconds[n] = seconds.get(n, 0.0) + time.perf_counter() - t
                record(n, domain, texts[n], reference)
            t = time.perf_counter()
            tok = ensemble.members[0].tokenizer
            new = ensemble.generate(tok(prompt, add_special_tokens=False)["input_ids"], args.max_new_tokens)
            seconds["ensemble-experts"] = seconds.get("ensemble-experts", 0.0) + time.perf_counter() - t
            record("ensemble-experts", domain, tok.decode(new, skip_special_tokens=True)[: len(reference)], reference)
            for crowd, members in crowds.items():
                candidates = [texts[n] for n in members]
                for kind in SIMILARITIES:
                    t = time.perf_counter()
                    winner, agreement = choose(candidates, kind, embedder.embed if kind == "embedding" else None)
                    key = f"vote-{crowd}-{kind}"
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
                    top = {candidates[i] for i in np.flatnonzero(agreement == agreement[winner])}
                    tied[key] = tied.get(key, 0) + int(len(top) > 1)  # different texts at the top: order decided
                    record(key, domain, candidates[winner], reference)
                best = max(candidates, key=lambda c: rouge_l_words(c, reference))
                record(f"oracle-{crowd}", domain, best, reference)

    table = {}
    for system, per_domain in results.items():
        row = {}
        for domain, pairs in per_domain.items():
            arr = np.array(pairs)
            row[domain] = {"rouge_l_word": round(float(arr[:, 0].mean()), 4), "rouge_l_char": round(float(arr[:, 1].mean()), 4),
                           "n": len(pairs)}
        every = np.array([p for pairs in per_domain.values() for p in pairs])
        row["mean"] = {"rouge_l_word": round(float(every[:, 0].mean()), 4), "rouge_l_char": round(float(every[:, 1].mean()), 4),
                       "word_std_error": round(float(every[:, 0].std(ddof=1) / np.sqrt(len(every))), 4),
                       "n": len(every), "degenerate": round(float(every[:, 2].mean()), 3)}
        if system in tied:
            row["mean"]["tied"] = round(tied[system] / len(every), 3)
        table[system] = row
    best_member = max(names, key=lambda n: table[n]["mean"]["rouge_l_word"])
    report = {
        "benchmark": "held-out continuation: ROUGE-L F1 of greedy continuations against the real text",
        "command": " ".join(["python bench/bench_vote.py", *(sys.argv[1:] if argv is None else argv)]),
        "scale": "quick" if args.quick else "full", "torch_threads": torch.get_num_threads(),
        "settings": {k: getattr(args, k) for k in ("prompts", "prompt_chars", "continuation_chars", "max_new_tokens")},
        "best_member": best_member,
        "ratio_to_best_member": {s: round(table[s]["mean"]["rouge_l_word"] / max(table[best_member]["mean"]["rouge_l_word"], 1e-9), 3)
                                 for s in table},
        "generation_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "wall_s": round(time.perf_counter() - started, 1),
        "results": table,
    }
    Path(args.report).mkdir(parents=True, exist_ok=True)
    path = Path(args.report) / ("vote-quick.json" if args.quick else "vote.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(table))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
