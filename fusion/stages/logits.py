"""logits: every model's next-token knowledge on every training block, sparse.

One part per model (the target included). For each block the model sees its BOS and then the
block's tokens; row j is its distribution over token j (fusion/sparse.py). Stored per row:
the top-k ids (narrowest unsigned type for the vocabulary) and log-probs (float16), the mass
outside the top-k (`tail`, float16) and the NLL of the real token (`nll`, float16); per
block: the token count, the total NLL in float32 and the UTF-8 byte count.
"""

from __future__ import annotations

import numpy as np

from fusion import models, shards
from fusion.errors import FusionError
from fusion.progress import bar
from fusion.run import Run
from fusion.stages import split

NAME = "logits"


def parts(run: Run) -> list[str]:
    return [m.name for m in run.spec.models.all()]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("split", "train")]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "split": run.hash("split", "train"),
        "model": run.model_identity(part),
        "top_k": run.spec.logits.top_k,
    }


def shard_count(run: Run, part: str) -> int:
    return split.shard_count(run, "train")


def id_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int64)


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Blocks grouped by length (longest first) so that padding stays small: each batch holds
    at most batch_tokens tokens, padding included."""
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


def forward_topk(model, batch_ids: list[list[int]], bos: int, top_k: int, device: str):
    """One padded forward pass. Returns per block (topk_ids, topk_logprobs, tail, nll) arrays."""
    import torch

    width = max(len(ids) for ids in batch_ids) + 1
    inputs = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros_like(inputs)
    for r, ids in enumerate(batch_ids):
        inputs[r, 0] = bos
        inputs[r, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        mask[r, : len(ids) + 1] = 1
    inputs, mask = inputs.to(device), mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top_lp, top_ids = logprobs.topk(top_k, dim=-1)
        tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)
        nll = -logprobs.gather(-1, inputs[:, 1:, None]).squeeze(-1)
    out = []
    for r, ids in enumerate(batch_ids):
        n = len(ids)
        out.append(tuple(t[r, :n].cpu().numpy() for t in (top_ids, top_lp, tail, nll)))
    return out


_loaded: dict = {}


def loaded_model(spec, device: str):
    """The model, loaded once per process for all the shards it computes (one model at a time)."""
    key = (spec.model_dump_json(), device)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = models.load_model(spec, device)
    return _loaded[key]


def run_shard(run: Run, part: str, index: int) -> None:
    spec = run.model(part)
    tokenizer = run.tokenizers[part]
    texts, _ = split.read_blocks(run, "train", index)
    token_ids = models.encode(tokenizer, texts)
    for i, ids in enumerate(token_ids):
        if len(ids) > run.spec.split.block_tokens:
            raise FusionError(f"model '{part}': block {i} of split shard {index} has {len(ids)} tokens > split.block_tokens")
    device = models.pick_device(run.spec.logits.device)
    model = loaded_model(spec, device)
    bos = models.context_token_id(spec, tokenizer)
    k = run.spec.logits.top_k
    results: list = [None] * len(texts)
    batches = length_batches([len(ids) for ids in token_ids], run.spec.logits.batch_tokens)
    for batch in bar(batches, desc=f"logits {part} shard {index}", unit="batch", leave=False):
        for i, res in zip(batch, forward_topk(model, [token_ids[i] for i in batch], bos, k, device)):
            results[i] = res
    arrays = pack(token_ids, results, [len(t.encode("utf-8")) for t in texts], models.logit_width(models.model_config(spec)), k)
    shards.write_shard(run.store, NAME, part, index, arrays, run.hash(NAME, part), rows=len(arrays["tokens"]))


def pack(token_ids: list[list[int]], results: list, text_bytes: list[int], vocab_size: int, k: int) -> dict[str, np.ndarray]:
    dt = id_dtype(vocab_size)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])

    def cat(j, shape, dtype):
        parts = [r[j] for r in results]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    nll32 = cat(3, (0,), np.float32)
    return {
        "tokens": np.array([t for ids in token_ids for t in ids], dtype=dt),
        "seq_ptr": ptr,
        "topk_ids": cat(0, (0, k), dt),
        "topk_logprobs": cat(1, (0, k), np.float16),
        "tail": cat(2, (0,), np.float16),
        "nll": nll32.astype(np.float16),
        "seq_nll": np.array([nll32[a:b].sum(dtype=np.float64) for a, b in zip(ptr[:-1], ptr[1:])], dtype=np.float32),
        "seq_bytes": np.array(text_bytes, dtype=np.int64),
    }


def read(run: Run, part: str, index: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    return shards.read_shard(run.store, NAME, part, index, names)
