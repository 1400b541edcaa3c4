"""Scoring text with causal LMs, on the model's device: for each real position the top-k ids
and log-probs, the mass outside them (tail) and the real token's NLL; blocks batched by
length; total NLL per block and bits per byte.

Used by the logits stage (top-k rows of every model), evaluation (bits per byte on held-out
text) and inference-time ensembles (fusion/ensemble.py).

Speed: blocks are batched by length (sorted, so padding stays a few per cent) and run under
inference mode; only real positions reach the output layer, which runs in chunks of rows so
that no [batch, length, vocab] float32 tensor is ever made; top-k, log-sum-exp and NLL are
computed on the device and only [rows, k] comes back.
"""

from __future__ import annotations

import math

import numpy as np

from fusion.progress import bar

# float32 logits made at once (rows x vocab): small on CPUs (cache), large on GPUs (few launches)
HEAD_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


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

    def __init__(self, model, k: int, device: str, continuations=None):
        """continuations: (fusion.continuations.PrefixRanges of the model's tokenizer, entries per
        row) to add each block's continuation rows to its results; None: none."""
        import torch

        self.model, self.k, self.device = model, k, device
        self.continuations = None
        if continuations is not None:
            from fusion.continuations import OnDevice

            self.continuations = (OnDevice(continuations[0], device), continuations[1])
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
        """Per block: (ids int32 [n,k], logprobs float16 [n,k], tail float16 [n], nll float32 [n]),
        then, with continuations, (depths [n], ids int32 [c,m], logprobs float16 [c,m], tail
        float16 [c]) of its c = depths.sum() continuation rows (fusion/continuations.py)."""
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
            fields = [t.cpu().numpy() for t in self._rows(hidden, targets, project)]
        out, start = [], 0
        cont_start = 0
        for n in lengths:
            block = tuple(f[start : start + n] for f in fields[:4])
            if self.continuations is not None:
                depths = fields[4][start : start + n]
                c = int(depths.sum())
                block += (depths,) + tuple(f[cont_start : cont_start + c] for f in fields[5:])
                cont_start += c
            out.append(block)
            start += n
        return out

    def _rows(self, hidden, targets, project):
        import torch

        vocab = self.head.out_features if project is not None else hidden.shape[-1]
        step = max(1, HEAD_CHUNK_BYTES.get(hidden.device.type, 64 << 20) // (4 * vocab))
        parts = []
        for a in range(0, hidden.shape[0], step):
            logits = (project(hidden[a : a + step]) if project is not None else hidden[a : a + step]).float()
            part = top_k_rows(logits, targets[a : a + step], self.k)
            if self.continuations is not None:
                from fusion.continuations import continuation_rows

                part += continuation_rows(logits, targets[a : a + step], *self.continuations)
            parts.append(part)
        if not parts:
            k = self.k
            empty = torch.zeros((0, k))
            fields = (empty.int(), empty.half(), empty[:, 0].half(), empty[:, 0])
            if self.continuations is not None:
                m = self.continuations[1]
                cont = torch.zeros((0, m))
                fields += (empty[:, 0].long(), cont.int(), cont.half(), cont[:, 0].half())
            return fields
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
    """Per block (topk_ids, topk_logprobs, tail, nll) for one batch."""
    return TopK(model, top_k, device)(batch_ids, bos)


# ---- many blocks ---------------------------------------------------------------------------------
def score_blocks(scorer: TopK, token_ids: list[list[int]], bos: int, batch_tokens: int, desc: str | None = None) -> list:
    """scorer's rows for every block, batched by length: per block (ids, logprobs, tail, nll)
    as TopK gives them, in the blocks' order. `desc`: a progress bar's label."""
    results: list = [None] * len(token_ids)
    batches = length_batches([len(ids) for ids in token_ids], batch_tokens)
    for batch in batches if desc is None else bar(batches, desc=desc, unit="batch", leave=False):
        for i, res in zip(batch, scorer([token_ids[i] for i in batch], bos)):
            results[i] = res
    return results


def concat(results: list, j: int, shape: tuple, dtype) -> np.ndarray:
    """Field j of score_blocks' results (0 ids, 1 logprobs, 2 tail, 3 nll), all blocks back to back."""
    parts = [r[j] for r in results]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)


def block_nll(model, token_ids: list[list[int]], bos: int, batch_tokens: int, device: str, desc: str | None = None) -> np.ndarray:
    """Total NLL (nats, float64) of each block of token ids under the model, every token
    predicted from `bos` and the tokens before it."""
    results = score_blocks(TopK(model, 1, device), token_ids, bos, batch_tokens, desc)
    return np.array([nll.astype(np.float64).sum() for _, _, _, nll in results], dtype=np.float64)


def bits_per_byte(nll_nats, texts: list[str]) -> float:
    """Total NLL in bits over the texts' UTF-8 bytes: independent of the tokenizer, so models
    with different vocabularies compare fairly."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return float(np.sum(nll_nats)) / math.log(2) / nbytes
