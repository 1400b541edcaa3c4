"""Scoring text with causal LMs, on the model's device: for each real position the top-k ids
and log-probs, the mass outside them (tail) and the real token's NLL; blocks batched by
length; total NLL per block and bits per byte.

Used by the logits stage (top-k rows of every model), evaluation (bits per byte on held-out
text) and inference-time ensembles (fusion/ensemble.py).

Speed: blocks are batched by length (sorted, so padding stays a few per cent) and run under
inference mode; only real positions reach the output layer, which runs in chunks of rows so
that no [batch, length, vocab] float32 tensor is ever made; top-k, log-sum-exp and NLL are
computed on the device and only [rows, k] comes back.

Top-k or sampled rows (`logits.method`). The top-k rows keep the k most probable tokens exactly
and lump the rest into the tail; whatever the loss does with the tail (one extra outcome, or
renormalising it away) is a guess at how that mass is spread, so the target is biased (Sparse
Logit Sampling, Anshumann et al. 2025, arXiv 2503.16870). `sampled_rows` stores k distinct
tokens too, in the same bytes, chosen at random so that the stored values are an unbiased
estimate of the WHOLE distribution: for every token i, E[stored p_i] = p_i (0 where i is not
drawn). The loss is linear in the teacher's probabilities, so its gradient is unbiased as well.

The estimator (Horvitz-Thompson with probability-proportional-to-size systematic sampling,
without replacement): the tokens with k' p_i > R are kept exactly ("certain"; at most k - 1 of
them, the most probable), where R is the mass of the rest and k' the slots left; the k' other
slots are filled by systematic sampling over the remaining tokens, token i drawn with
probability pi_i = k' p_i / R <= 1, one uniform number per row. A drawn token's estimate is
p_i / pi_i = R / k', the same for all of them, so the stored row sums to exactly 1 (certain
mass + k' R / k') and the tail is 0. Both matter: the loss renormalises a teacher row (listed
mass plus tail), and renormalising an estimate that does not sum to 1 would bias it again;
keeping the exact remaining mass as a tail as well would count it twice. (Only rows whose
whole mass fits in k exact entries keep their float32-negligible remainder as tail.) The paper
draws with replacement from the teacher's distribution and keeps counts; drawing without
replacement gives exactly k distinct entries, the bytes of top-k, and never spends a slot
twice on a frequent token. pi proportional to p is also the choice that minimises the summed
variance of the estimates for k draws, and any other proposal (a temperature) would make the
estimates no longer sum to 1, so there is no proposal to tune.

The real token's NLL is always the model's own; the stored value of a sampled entry is an
estimate, so fusion/encoding.py stores the NLL of rows whose real token is a sampled entry.
The uniform numbers come from a seed and each block's tokens (`row_uniforms`), so a shard's
rows do not depend on batching, chunking or device order, and a rerun gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fusion.progress import bar
from fusion.sparse import canonical_order

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
            part = self._chunk_rows(logits, targets[a : a + step], a)
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

    def _chunk_rows(self, logits, targets, first: int):
        """The rows of one chunk of the batch's real positions; `first`: its first row's index."""
        return top_k_rows(logits, targets, self.k)


class Sampled(TopK):
    """TopK's scorer with sampled rows (`sampled_rows`) in place of the top-k: k distinct ids
    per position whose stored probabilities estimate the model's distribution without bias.
    `seed`: the shard's seed (the logits stage derives it from the run, the model and the shard)."""

    def __init__(self, model, k: int, device: str, seed: int, continuations=None):
        super().__init__(model, k, device, continuations)
        self.seed = seed

    def __call__(self, batch_ids: list[list[int]], bos: int) -> list[tuple[np.ndarray, ...]]:
        import torch

        # rows in the order TopK makes them: block by block, position by position
        self._uniforms = torch.from_numpy(np.concatenate([row_uniforms(self.seed, ids) for ids in batch_ids]))
        return super().__call__(batch_ids, bos)

    def _chunk_rows(self, logits, targets, first: int):
        uniforms = self._uniforms[first : first + len(targets)].to(logits.device)
        return sampled_rows(logits, targets, self.k, uniforms)


def row_uniforms(seed: int, block: list[int]) -> np.ndarray:
    """One uniform number in [0, 1) per position of a block, from the seed and the block's tokens."""
    digest = hashlib.blake2b(np.asarray(block, dtype=np.int64).tobytes(), digest_size=16).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")]).random(len(block))


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
    ids, values = canonical_order(*reversed(_top_k(logprobs, k)))
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    nll = -logprobs.gather(-1, targets[:, None].long()).squeeze(-1)
    return ids.int(), values.half(), tail.half(), nll


# a kept token's inclusion probability stays this far below 1, so that rounding in the cumulative
# sums can never place two of a row's evenly spaced sampling points in one token
CERTAIN_MARGIN = 1e-6


def sampled_rows(logits, targets, k: int, uniforms):
    """For float32 logits [rows, vocab] and one uniform number in [0, 1) per row (float64):
    k distinct ids (int32) and the logs of unbiased estimates of their probabilities (float16),
    ordered by value then id; tail (float16) and the targets' true NLL (float32), all on the
    logits' device. See the module doc for the estimator.

    Every sampled entry of a row carries the same value, the row's smallest: it is lowered, where
    float16 rounding would put a certain entry below it, to that entry's value (one float16 step
    at most), so that fusion/encoding.py can tell sampled entries by their value."""
    import torch

    rows, vocab = logits.shape
    k = min(k, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = _top_k(logprobs, k)
    top_lp, order = top_lp.sort(dim=-1, descending=True)
    top_ids = top_ids.gather(-1, order)

    # the mass outside the top-k, then rest[:, m]: the mass of every token ranked below the m most probable
    mass = logprobs.exp()
    p_top = mass.gather(-1, top_ids)
    mass.scatter_(-1, top_ids, 0.0)
    outside = mass.sum(-1, dtype=torch.float64)
    below = p_top.double().flip(-1).cumsum(-1).flip(-1)  # mass of top-k entries m..k-1
    rest = torch.cat([below, torch.zeros_like(below[:, :1])], -1) + outside[:, None]
    # certain: the m most probable, m the first count that leaves every other token's pi_i < 1
    slots = torch.arange(k, device=logits.device)
    fits = (k - slots) * p_top.double() <= (1 - CERTAIN_MARGIN) * rest[:, :k]
    fits &= rest[:, :k] > 0
    certain = torch.where(fits.any(-1), fits.int().argmax(-1), torch.full((rows,), k, device=logits.device))
    drawn = k - certain  # k' per row

    # systematic sampling over the uncertain tokens: points (u + j) R / k', j = 0..k'-1
    is_certain = slots[None] < certain[:, None]
    mass.scatter_(-1, top_ids, torch.where(is_certain, 0.0, p_top))
    cumulative = mass.cumsum(-1, dtype=torch.float64)
    remaining = cumulative[:, -1]
    step = remaining / drawn.clamp_min(1)
    j = (slots[None] - certain[:, None]).clamp_min(0)
    points = (uniforms[:, None] + j) * step[:, None]
    points = torch.minimum(points, torch.nextafter(remaining, torch.zeros_like(remaining))[:, None])
    picked = torch.searchsorted(cumulative, points.contiguous(), right=True).clamp_max(vocab - 1)

    ids = torch.where(is_certain, top_ids, picked)
    values = torch.where(is_certain, top_lp, step.log().float()[:, None]).half()
    lowest_certain = values.masked_fill(~is_certain, float("inf")).amin(-1, keepdim=True)
    values = torch.where(is_certain, values, torch.minimum(values, lowest_certain)).float()
    # canonical order: by value, descending; ties by ascending id
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    tail = torch.where(drawn > 0, torch.zeros_like(outside), outside.clamp_min(0.0)).float()
    nll = -logprobs.gather(-1, targets[:, None].long()).squeeze(-1)
    return ids.int(), values.half(), tail.half(), nll


def _top_k(logprobs, k: int):
    """(values, ids) of the k largest entries of each row, unordered: the two-stage selection on
    CPUs where the row is long enough for it to pay, torch.topk elsewhere."""
    group = _group_size(logprobs.shape[-1], k)
    if logprobs.device.type == "cpu" and group:
        return _two_stage_topk(logprobs, k, group)
    return logprobs.topk(k, dim=-1, sorted=False)


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
