"""logits: every model's next-token knowledge on every training block, sparse.

One part per model (the target included). For each block the model sees its BOS and then the
block's tokens; row j is its distribution over token j (fusion/sparse.py). Per row: the top-k
ids and log-probs (float16), the mass outside the top-k (`tail`, float16) and the NLL of the
real token (`nll`, float16); per block: the total NLL in float32 (summed from float32 values)
and the UTF-8 byte count. Top-k entries are ordered by log-prob, ties by id.

Stored compactly and exactly (fusion/encoding.py): tokens and ids in the narrowest unsigned
type, log-probs as row-wise deltas of their float16 bit patterns, the real token's id and
NLL only where they cannot be derived. `read` gives back the arrays above.

Speed: blocks are batched by length (sorted, so padding stays a few per cent), run under
inference mode in bfloat16 on GPUs; only real positions reach the output layer, which runs in
chunks of rows so that no [batch, length, vocab] float32 tensor is ever made; top-k,
log-sum-exp and NLL are computed on the device and only [rows, k] comes back.
"""

from __future__ import annotations

import numpy as np

from fusion import encoding, models, shards
from fusion.encoding import id_dtype  # noqa: F401  (re-exported: stages use logits.id_dtype)
from fusion.errors import FusionError
from fusion.progress import bar
from fusion.run import Run
from fusion.stages import Stage
from fusion.stages import split

NAME = "logits"
FORMAT = 2  # storage format; part of the config hash, so old shards are never misread
# float32 logits made at once (rows x vocab): small on CPUs (cache), large on GPUs (few launches)
HEAD_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def parts(run: Run) -> list[str]:
    return [m.name for m in run.spec.models.all()]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("split", "train")]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "split": run.hash("split", "train"),
        "model": run.model_identity(part),
        "top_k": run.spec.logits.top_k,
        "dtype": run.spec.logits.dtype,
        "format": FORMAT,
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


# ---- batching ------------------------------------------------------------------------------------
def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Blocks grouped by length (longest first) so that padding stays small: each batch holds
    at most batch_tokens tokens, padding and BOS included."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, width = [], [], 0
    for i in order:
        w = max(width, lengths[i] + 1)
        if current and w * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, w = [], lengths[i] + 1
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


# ---- the model's top-k ---------------------------------------------------------------------------
class TopK:
    """A causal LM that returns, for the real positions of a batch, top-k ids and log-probs,
    the tail mass and the real token's NLL, computed on the model's device."""

    def __init__(self, model, k: int, device: str):
        import torch

        self.model, self.k, self.device = model, k, device
        self.head = model.get_output_embeddings()
        self.body = getattr(model, model.base_model_prefix, None)
        if not hasattr(model, "_fusion_split_head"):  # probed once per model object
            model._fusion_split_head = self.head is not None and self.body is not None and self._head_matches(torch)
        self.split_head = model._fusion_split_head

    def _head_matches(self, torch) -> bool:
        """Whether logits == head(last hidden state) for this architecture (no soft-capping,
        scaling or the like after the output layer); otherwise the full forward is used."""
        probe = torch.arange(1, 9, device=self.device)[None] % max(2, self.head.out_features)
        with torch.inference_mode():
            full = self.model(input_ids=probe).logits.float()
            hidden = self.body(input_ids=probe).last_hidden_state
            split = self.head(hidden).float()
        return full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)

    def __call__(self, batch_ids: list[list[int]], bos: int) -> list[tuple[np.ndarray, ...]]:
        """Per block: (ids int32 [n,k], logprobs float16 [n,k], tail float16 [n], nll float32 [n])."""
        import torch

        lengths = [len(ids) for ids in batch_ids]
        width = max(lengths) + 1
        inputs = torch.zeros((len(batch_ids), width), dtype=torch.long)
        mask = torch.zeros_like(inputs)
        for r, ids in enumerate(batch_ids):
            inputs[r, 0] = bos
            inputs[r, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
            mask[r, : len(ids) + 1] = 1
        real = mask[:, 1:].bool()  # positions that predict a real token
        targets = inputs[:, 1:][real].to(self.device)
        inputs, mask, real = inputs.to(self.device), mask.to(self.device), real.to(self.device)
        with torch.inference_mode():
            if self.split_head:
                hidden = self.body(input_ids=inputs, attention_mask=mask).last_hidden_state[:, :-1][real]
                project = self.head
            else:
                hidden = self.model(input_ids=inputs, attention_mask=mask).logits[:, :-1][real]
                project = None
            ids, lp, tail, nll = self._rows(hidden, targets, project)
        ids, lp, tail, nll = (t.cpu().numpy() for t in (ids, lp, tail, nll))
        out, start = [], 0
        for n in lengths:
            out.append((ids[start : start + n], lp[start : start + n], tail[start : start + n], nll[start : start + n]))
            start += n
        return out

    def _rows(self, hidden, targets, project):
        import torch

        vocab = self.head.out_features if project is not None else hidden.shape[-1]
        step = max(1, HEAD_CHUNK_BYTES.get(hidden.device.type, 64 << 20) // (4 * vocab))
        parts = []
        for a in range(0, hidden.shape[0], step):
            logits = (project(hidden[a : a + step]) if project is not None else hidden[a : a + step]).float()
            parts.append(top_k_rows(logits, targets[a : a + step], self.k))
        if not parts:
            k = self.k
            empty = torch.zeros((0, k))
            return empty.int(), empty.half(), empty[:, 0].half(), empty[:, 0]
        return tuple(torch.cat(p) for p in zip(*parts))


def top_k_rows(logits, targets, k: int):
    """For float32 logits [rows, vocab]: top-k ids (int32) and log-probs (float16) ordered by
    value then id, tail (float16) and the targets' NLL (float32), all on the logits' device.
    (Which of several values tied at the k-th place is kept is torch.topk's choice.)

    Log-probs come from log_softmax (one fused kernel; faster than logsumexp on CPUs). On
    CPUs the top-k is a two-stage selection: the maximum of every group of columns, the k
    groups with the largest maxima (which must hold the k largest values), then top-k among
    their columns; it reads the row once instead of partially sorting it."""
    import torch

    rows, vocab = logits.shape
    k = min(k, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    group = _group_size(vocab, k)
    if logprobs.device.type == "cpu" and group:
        values, ids = _two_stage_topk(logprobs, k, group)
    else:
        values, ids = logprobs.topk(k, dim=-1, sorted=False)
    # canonical order: by value, descending; ties by ascending id
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    nll = -logprobs.gather(-1, targets[:, None].long()).squeeze(-1)
    return ids.int(), values.half(), tail.half(), nll


def _group_size(vocab: int, k: int) -> int:
    """Columns per group for the two-stage top-k (0: too few columns for it to pay)."""
    group = 128
    while group > 16 and vocab < 8 * k * group:
        group //= 2
    return group if vocab >= 8 * k * group else 0


def _two_stage_topk(x, k: int, group: int):
    import torch

    rows, vocab = x.shape
    groups = vocab // group
    body = x[:, : groups * group].view(rows, groups, group)
    best_groups = body.amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # [rows, k]
    cols = (best_groups[:, :, None] * group + torch.arange(group, device=x.device)).reshape(rows, -1)
    if groups * group < vocab:  # the columns left over are always candidates
        rest = torch.arange(groups * group, vocab, device=x.device).expand(rows, -1)
        cols = torch.cat([cols, rest], dim=1)
    values, pick = x.gather(-1, cols).topk(k, dim=-1, sorted=False)
    return values, cols.gather(-1, pick)


def forward_topk(model, batch_ids: list[list[int]], bos: int, top_k: int, device: str):
    """Per block (topk_ids, topk_logprobs, tail, nll) for one batch (also used by evaluation)."""
    return TopK(model, top_k, device)(batch_ids, bos)


# ---- the stage -----------------------------------------------------------------------------------
def compute_dtype(run: Run, part: str, device: str) -> str:
    setting = run.spec.logits.dtype
    if setting != "auto":
        return setting
    return "bfloat16" if device == "cuda" else run.model(part).dtype


_scorer: dict = {}  # the last model used, kept for the next shard of the same part


def scorer_for(run: Run, part: str, device: str) -> TopK:
    spec = run.model(part)
    dtype = compute_dtype(run, part, device)
    key = (run.hash(NAME, part), device, dtype)
    if key not in _scorer:
        _scorer.clear()
        _scorer[key] = TopK(models.load_model(spec, device, dtype=dtype), run.spec.logits.top_k, device)
    return _scorer[key]


def run_shard(run: Run, part: str, index: int) -> None:
    spec = run.model(part)
    tokenizer = run.tokenizers[part]
    texts, _ = split.read_blocks(run, "train", index)
    token_ids = models.encode(tokenizer, texts)
    for i, ids in enumerate(token_ids):
        if len(ids) > run.spec.split.block_tokens:
            raise FusionError(f"model '{part}': block {i} of split shard {index} has {len(ids)} tokens > split.block_tokens")
    device = models.pick_device(run.spec.logits.device)
    scorer = scorer_for(run, part, device)
    bos = models.context_token_id(spec, tokenizer)
    results: list = [None] * len(texts)
    batches = length_batches([len(ids) for ids in token_ids], run.spec.logits.batch_tokens)
    for batch in bar(batches, desc=f"logits {part} shard {index}", unit="batch", leave=False):
        for i, res in zip(batch, scorer([token_ids[i] for i in batch], bos)):
            results[i] = res
    vocab = models.logit_width(models.model_config(spec))
    arrays = pack(token_ids, results, [len(t.encode("utf-8")) for t in texts], vocab, run.spec.logits.top_k)
    shards.write_shard(run.store, NAME, part, index, arrays, run.hash(NAME, part), rows=len(arrays["tokens"]))


def pack(
    token_ids: list[list[int]], results: list, text_bytes: list[int], vocab_size: int, k: int
) -> dict[str, np.ndarray]:
    """The stored arrays of a shard (fusion/encoding.py)."""
    dt = id_dtype(vocab_size)
    tokens = np.array([t for ids in token_ids for t in ids], dtype=dt)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    k = min(k, vocab_size)

    def cat(j, shape, dtype):
        parts = [r[j] for r in results]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    ids, logprobs = cat(0, (0, k), np.int64), cat(1, (0, k), np.float16)
    nll32 = cat(3, (0,), np.float32)
    ptr = encoding.row_ptr(lengths)
    rows = encoding.encode_rows(np.full(len(tokens), k), ids.reshape(-1), logprobs.reshape(-1), tokens, vocab_size)
    return {
        "tokens": tokens,
        "seq_len": encoding.narrow_uint(lengths),
        **rows,
        "tail": cat(2, (0,), np.float16),
        "nll_absent": encoding.encode_nll(nll32, rows["rank"]),
        "seq_nll": np.array([nll32[a:b].sum(dtype=np.float64) for a, b in zip(ptr[:-1], ptr[1:])], dtype=np.float32),
        "seq_bytes": encoding.narrow_uint(np.array(text_bytes, dtype=np.int64)),
    }


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
}


def read(run: Run, part: str, index: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """tokens, seq_ptr (int64), topk_ids (int32 [rows, k]), topk_logprobs (float16 [rows, k]),
    tail, nll (float16), seq_nll (float32), seq_bytes (int64), or the `names` among them."""
    names = list(NEEDS) if names is None else names
    unknown = [n for n in names if n not in NEEDS]
    if unknown:
        raise FusionError(f"logits: no array {', '.join(unknown)} (known: {', '.join(NEEDS)})")
    needed = sorted({s for n in names for s in NEEDS[n]})
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
            out[name] = encoding.decode_nll(stored["nll_absent"], stored["rank"], counts, logprobs)
        elif name == "seq_bytes":
            out[name] = stored["seq_bytes"].astype(np.int64)
        else:
            out[name] = stored[name]
    return out


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard)
