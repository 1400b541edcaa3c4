"""How much time the logits stage spends beyond the model's forward pass, at batch 8 x 2048.

    python bench/bench_logits.py [--tokenizer tok-llama2] [--repeats 3] [--store URL]

One process, side by side, repeated and interleaved (the median is reported):
- forward:  `model(input_ids, attention_mask).logits`, the plain forward pass (baseline)
- stage:    what the stage does for the same batch: the model body, the output layer in
            chunks of rows, top-k / log-sum-exp / NLL on the device, the copy to the host,
            packing and encoding, compression, and the upload to a store
- naive:    the forward pass followed by the textbook post-processing (log_softmax over the
            whole [batch, length, vocab] tensor, topk, gather), as the stage did before
- sampled:  the stage with `logits.method: sampled` (fusion/scoring.py: sampled_rows), the same
            k entries per token drawn with importance weights instead of the top-k
- continuations: the stage with continuation rows (`logits.continuations: 4`, the default;
            fusion/continuations.py); `stage` itself runs without them (`logits.continuations: 0`)

The model is a tiny Llama (hidden 128, 2 layers) with a real tokenizer's vocabulary (Llama-2's
32000 by default; `--tokenizer tok-qwen3` for 151,669) and random weights: the time of the
forward pass and of top-k does not depend on what the weights are. The text is real
(../shared/assets), tokenized by that tokenizer. Prints JSON; `overhead_ratio` = (stage - forward) / forward; `sampled_over_top_k`:
the sampled stage's time over the top-k stage's (wall and CPU), compute alone and whole.
Stored bytes here are those of random weights; bench/bench_bytes.py measures trained models'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fusion import scoring, shards  # noqa: E402
from fusion.stages import logits  # noqa: E402
from fusion.store import Store  # noqa: E402

BATCH, LENGTH, K, M = 8, 2048, 10, 4


def model_with_vocab(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def real_blocks(tok) -> list[list[int]]:
    import realtext

    text = realtext.corpora()["docs"][:400_000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [ids[i * LENGTH : (i + 1) * LENGTH - 1] for i in range(BATCH)]  # BOS + 2047 = 2048 positions


def naive(model, inputs, mask, targets, real):
    with torch.inference_mode():
        lg = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
        lp = torch.log_softmax(lg.float(), dim=-1)
        top_lp, top_ids = lp.topk(K, dim=-1)
        tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)
        nll = -lp.gather(-1, inputs[:, 1:, None]).squeeze(-1)
        return top_ids[real].cpu(), top_lp[real].cpu(), tail[real].cpu(), nll[real].cpu()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="tok-llama2", help="a tokenizer asset of ../shared/assets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", help="store URL for the upload (default: a temporary local folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import realtext

    from fusion.align import token_view
    from fusion.continuations import prefix_ranges

    tok = realtext.tokenizer(args.tokenizer)
    args.vocab = len(tok)
    model = model_with_vocab(args.vocab)
    blocks = real_blocks(tok)
    scorer = scoring.TopK(model, K, "cpu")
    sampler = scoring.Sampled(model, K, "cpu", seed=0)
    with_continuations = scoring.TopK(model, K, "cpu", (prefix_ranges(token_view(tok)), M))
    inputs = torch.tensor([[1] + b for b in blocks])
    mask = torch.ones_like(inputs)
    real = mask[:, 1:].bool()
    tmp = tempfile.TemporaryDirectory()
    store = Store(args.store or tmp.name)
    text_bytes = [4 * len(b) for b in blocks]

    def forward():
        with torch.inference_mode():
            return model(input_ids=inputs, attention_mask=mask).logits

    times = {"forward": [], "stage": [], "stage_compute": [], "pack_compress_upload": [], "naive": []}
    times |= {"stage_sampled": [], "stage_compute_sampled": [], "cpu_stage": [], "cpu_stage_sampled": []}
    times |= {"stage_continuations": [], "cpu_stage_continuations": []}

    def stage(scoring_of, method: str, rep: int, m: int = 0):
        """(compute seconds, whole-stage seconds, CPU seconds, commit record) of one batch."""
        t0, c0 = time.perf_counter(), time.process_time()
        results = scoring_of(blocks, 1)
        t1 = time.perf_counter()
        arrays = logits.pack(blocks, results, text_bytes, args.vocab, K, method, m)
        record = shards.write_shard(store, "logits", f"{method}-{m}", rep, arrays, "bench", rows=len(arrays["tokens"]))
        return t1 - t0, time.perf_counter() - t0, time.process_time() - c0, record

    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        t0 = time.perf_counter()
        forward()
        forward_s = time.perf_counter() - t0
        top_k = stage(scorer, "top-k", rep)
        sampled = stage(sampler, "sampled", rep)
        continued = stage(with_continuations, "top-k", rep, M)
        t0 = time.perf_counter()
        naive(model, inputs, mask, inputs[:, 1:], real)
        naive_s = time.perf_counter() - t0
        if rep:
            times["forward"].append(forward_s)
            times["naive"].append(naive_s)
            times["stage_compute"].append(top_k[0])
            times["pack_compress_upload"].append(top_k[1] - top_k[0])
            times["stage"].append(top_k[1])
            times["cpu_stage"].append(top_k[2])
            times["stage_compute_sampled"].append(sampled[0])
            times["stage_sampled"].append(sampled[1])
            times["cpu_stage_sampled"].append(sampled[2])
            times["stage_continuations"].append(continued[1])
            times["cpu_stage_continuations"].append(continued[2])
    record, record_sampled, record_continued = top_k[3], sampled[3], continued[3]
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = BATCH * LENGTH
    print(
        json.dumps(
            {
                "batch": [BATCH, LENGTH],
                "vocab": args.vocab,
                "model": "llama hidden 128, 2 layers, random weights",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "split_head": scorer.split_head,
                "seconds_median": {k: round(v, 4) for k, v in med.items()},
                "overhead_ratio": round((med["stage"] - med["forward"]) / med["forward"], 4),
                "naive_overhead_ratio": round((med["naive"] - med["forward"]) / med["forward"], 4),
                "pack_compress_upload_ratio": round(med["pack_compress_upload"] / med["forward"], 4),
                "sampled_over_top_k": {
                    "stage_wall": round(med["stage_sampled"] / med["stage"], 4),
                    "stage_cpu": round(med["cpu_stage_sampled"] / med["cpu_stage"], 4),
                    "compute_wall": round(med["stage_compute_sampled"] / med["stage_compute"], 4),
                },
                "sampled_overhead_ratio": round((med["stage_sampled"] - med["forward"]) / med["forward"], 4),
                "continuations_over_none": {
                    "stage_wall": round(med["stage_continuations"] / med["stage"], 4),
                    "stage_cpu": round(med["cpu_stage_continuations"] / med["cpu_stage"], 4),
                },
                "stored_bytes_per_token_continuations": round(record_continued["stored_bytes"] / tokens, 2),
                "stored_bytes_per_token": round(record["stored_bytes"] / tokens, 2),
                "stored_bytes_per_token_sampled": round(record_sampled["stored_bytes"] / tokens, 2),
                "store": store.url if args.store else "local temporary folder",
                "repeats": args.repeats,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
