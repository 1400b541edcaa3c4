"""logits: every model's next-token knowledge on every training block, sparse.

One part per model (the target included). For each block the model sees its BOS and then the
block's tokens; row j is its distribution over token j (fusion/sparse.py). Per row: the top-k
ids and log-probs (float16), the mass outside the top-k (`tail`, float16) and the NLL of the
real token (`nll`, float16); per block: the total NLL in float32 (summed from float32 values)
and the UTF-8 byte count. Top-k entries are ordered by log-prob, ties by id. With
`logits.continuations` > 0, also each row's continuation rows (fusion/continuations.py): one per
byte boundary inside the row's real token, up to 16 (`cont_depth` per row), each with up to that
many entries, ordered the same way, and its tail.

With `logits.method: sampled` the k entries of a row are drawn at random instead
(fusion/scoring.py: sampled_rows): their values are the logs of unbiased estimates of the
model's probabilities, summing to 1 (tail 0), in the same order and arrays; `nll` is still the
model's own. Each shard's draws come from a seed derived from the stage's config hash (which
covers the model, the blocks and the settings), the part and the shard index, so a rerun
writes the same bytes.

Stored compactly and exactly (fusion/encoding.py): tokens and ids in the narrowest unsigned
type, log-probs as row-wise deltas of their float16 bit patterns, the real token's id and
NLL only where they cannot be derived (for sampled rows also where the real token is one of
the sampled entries: `nll_estimated`). `read` gives back the arrays above.

The scoring itself (top-k on the device, batching by length) is fusion/scoring.py; on GPUs
it runs in bfloat16 unless logits.dtype says otherwise.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fusion import encoding, models, shards
from fusion.scoring import Sampled, TopK, concat, score_blocks
from fusion.encoding import id_dtype  # noqa: F401  (re-exported: stages use logits.id_dtype)
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import Stage
from fusion.stages import split

NAME = "logits"
FORMAT = 3  # storage format; part of the config hash, so old shards are never misread


def parts(run: Run) -> list[str]:
    return [m.name for m in run.spec.models.all()]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("split", "train")]


def fingerprint(run: Run, part: str) -> dict:
    out = {
        "split": run.hash("split", "train"),
        "model": run.model_identity(part),
        "top_k": run.spec.logits.top_k,
        "continuations": run.spec.logits.continuations,
        "dtype": run.spec.logits.dtype,
        "format": FORMAT,
    }
    if run.spec.logits.method != "top-k":  # top-k runs keep the hash (and captures) they had before methods existed
        out["method"] = run.spec.logits.method
    return out


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


# ---- the stage -----------------------------------------------------------------------------------
def compute_dtype(run: Run, part: str, device: str) -> str:
    setting = run.spec.logits.dtype
    if setting != "auto":
        return setting
    return "bfloat16" if device == "cuda" else run.model(part).dtype


_model: dict = {}  # the last model used, kept for the next shard of the same part


def scorer_for(run: Run, part: str, device: str, index: int) -> TopK:
    spec = run.model(part)
    dtype = compute_dtype(run, part, device)
    key = (run.hash(NAME, part), device, dtype)
    if key not in _model:
        _model.clear()
        _model[key] = models.load_model(spec, device, dtype=dtype)
    ranges = None
    if run.spec.logits.continuations > 0:
        from fusion.continuations import prefix_ranges
        from fusion.stages.vocab import token_view

        ranges = (prefix_ranges(token_view(run, part)), run.spec.logits.continuations)
    if run.spec.logits.method == "sampled":
        return Sampled(_model[key], run.spec.logits.top_k, device, shard_seed(run, part, index), ranges)
    return TopK(_model[key], run.spec.logits.top_k, device, ranges)


def shard_seed(run: Run, part: str, index: int) -> int:
    """The seed of a shard's sampled rows: the same for a rerun, different for every model and shard."""
    digest = hashlib.sha256(f"{run.hash(NAME, part)}/{part}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def run_shard(run: Run, part: str, index: int) -> None:
    spec = run.model(part)
    tokenizer = run.tokenizers[part]
    texts, _ = split.read_blocks(run, "train", index)
    token_ids = models.encode(tokenizer, texts)
    # blocks are cut for the sources' tokenizers; the target's may run longer, within its context
    limit = run.spec.split.block_tokens
    if part == run.target.name:
        limit = (models.max_positions(models.model_config(spec)) or 10**9) - 1
    for i, ids in enumerate(token_ids):
        if len(ids) > limit:
            what = "split.block_tokens" if part != run.target.name else "the target's context (less BOS)"
            raise FusionError(
                f"model '{part}': block {i} of split shard {index} has {len(ids)} tokens > {what} ({limit}); "
                f"lower split.block_tokens"
            )
    device = models.pick_device(run.spec.logits.device)
    scorer = scorer_for(run, part, device, index)
    bos = models.context_token_id(spec, tokenizer)
    results = score_blocks(scorer, token_ids, bos, run.spec.logits.batch_tokens, desc=f"logits {part} shard {index}")
    vocab = models.logit_width(models.model_config(spec))
    text_bytes = [len(t.encode("utf-8")) for t in texts]
    arrays = pack(token_ids, results, text_bytes, vocab, run.spec.logits.top_k, run.spec.logits.method,
                  run.spec.logits.continuations)
    shards.write_shard(run.store, NAME, part, index, arrays, run.hash(NAME, part), rows=len(arrays["tokens"]))


def pack(
    token_ids: list[list[int]], results: list, text_bytes: list[int], vocab_size: int, k: int,
    method: str = "top-k", m: int = 0
) -> dict[str, np.ndarray]:
    """The stored arrays of a shard (fusion/encoding.py); `method`: how the rows were made; m:
    continuation entries (results then carry continuation rows, TopK's fields 4 to 7)."""
    dt = id_dtype(vocab_size)
    tokens = np.array([t for ids in token_ids for t in ids], dtype=dt)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    k = min(k, vocab_size)
    ids, logprobs = concat(results, 0, (0, k), np.int64), concat(results, 1, (0, k), np.float16)
    nll32 = concat(results, 3, (0,), np.float32)
    ptr = encoding.row_ptr(lengths)
    counts = np.full(len(tokens), k)
    rows = encoding.encode_rows(counts, ids.reshape(-1), logprobs.reshape(-1), tokens, vocab_size)
    cont = {}
    if m > 0:
        depths = concat(results, 4, (0,), np.int64)
        cont_ids = concat(results, 5, (0, m), np.int64)
        cont_lp = concat(results, 6, (0, m), np.float16)
        listed = cont_ids >= 0  # entries come first in a row, padding after them
        real = np.repeat(tokens.astype(np.int64), depths)  # each continuation row's real token
        encoded = encoding.encode_rows(listed.sum(1), cont_ids[listed], cont_lp[listed], real, vocab_size)
        cont = {"cont_depth": encoding.narrow_uint(depths), **{f"cont_{name}": a for name, a in encoded.items()},
                "cont_tail": concat(results, 7, (0,), np.float16)}
    arrays = {
        "tokens": tokens,
        "seq_len": encoding.narrow_uint(lengths),
        **rows,
        **cont,
        "tail": concat(results, 2, (0,), np.float16),
        "nll_absent": encoding.encode_nll(nll32, rows["rank"]),
        "seq_nll": np.array([nll32[a:b].sum(dtype=np.float64) for a, b in zip(ptr[:-1], ptr[1:])], dtype=np.float32),
        "seq_bytes": encoding.narrow_uint(np.array(text_bytes, dtype=np.int64)),
    }
    if method == "sampled":
        estimated = encoding.estimated_rows(rows["rank"], counts, logprobs.reshape(-1))
        arrays["nll_estimated"] = nll32.astype(np.float16)[estimated]
    return arrays


# what each array that `read` gives is decoded from
NEEDS = {
    "tokens": ["tokens"],
    "seq_ptr": ["seq_len"],
    "topk_ids": ["counts", "id_table", "ids", "rank", "tokens"],
    "topk_logprobs": ["counts", "lp_delta"],
    "tail": ["tail"],
    "nll": ["counts", "lp_delta", "rank", "nll_absent"],
    "seq_nll": ["seq_nll"],
    "seq_bytes": ["seq_bytes"],
    # continuation rows (logits.continuations > 0): per row how many, then the rows back to back
    "cont_depth": ["cont_depth"],
    "cont_counts": ["cont_counts"],
    "cont_ids": ["cont_depth", "cont_counts", "cont_id_table", "cont_ids", "cont_rank", "tokens"],
    "cont_logprobs": ["cont_counts", "cont_lp_delta"],
    "cont_tail": ["cont_tail"],
}


def read(run: Run, part: str, index: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """tokens, seq_ptr (int64), topk_ids (int32 [rows, k]), topk_logprobs (float16 [rows, k]),
    tail, nll (float16), seq_nll (float32), seq_bytes (int64), or the `names` among them; the
    continuation rows (cont_depth per row; cont_counts, flat cont_ids and cont_logprobs,
    cont_tail per continuation row) only when named, and only from a part that stores them."""
    names = [n for n in NEEDS if not n.startswith("cont_")] if names is None else names
    unknown = [n for n in names if n not in NEEDS]
    if unknown:
        raise FusionError(f"logits: no array {', '.join(unknown)} (known: {', '.join(NEEDS)})")
    needed = sorted({s for n in names for s in NEEDS[n]})
    if "nll" in names and run.spec.logits.method == "sampled":
        needed.append("nll_estimated")
    stored = shards.read_shard(run.store, NAME, part, index, needed, run.hash(NAME, part))
    return decode(stored, names, run.spec.logits.top_k)


def decode(stored: dict[str, np.ndarray], names: list[str], k: int) -> dict[str, np.ndarray]:
    counts = stored.get("counts")
    width = int(counts[0]) if counts is not None and len(counts) else k
    logprobs = None
    if {"topk_logprobs", "nll"} & set(names):
        logprobs = encoding.decode_logprobs(stored)
    out = {}
    for name in names:
        if name == "seq_ptr":
            out[name] = encoding.row_ptr(stored["seq_len"].astype(np.int64))
        elif name == "topk_ids":
            out[name] = encoding.decode_ids(stored, stored["tokens"]).reshape(-1, width)
        elif name == "topk_logprobs":
            out[name] = logprobs.reshape(-1, width)
        elif name == "nll":
            estimated = stored.get("nll_estimated")
            out[name] = encoding.decode_nll(stored["nll_absent"], stored["rank"], counts, logprobs, estimated)
        elif name == "seq_bytes":
            out[name] = stored["seq_bytes"].astype(np.int64)
        elif name == "cont_ids":
            real = np.repeat(stored["tokens"].astype(np.int64), stored["cont_depth"].astype(np.int64))
            out[name] = encoding.decode_ids({k[5:]: v for k, v in stored.items() if k.startswith("cont_")}, real)
        elif name == "cont_logprobs":
            out[name] = encoding.decode_logprobs({"counts": stored["cont_counts"], "lp_delta": stored["cont_lp_delta"]})
        elif name in ("cont_depth", "cont_counts"):
            out[name] = stored[name].astype(np.int64)
        else:
            out[name] = stored[name]
    return out


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard, stored_per="token")
