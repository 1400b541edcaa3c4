"""train: continual training of the target on the packed blocks.

loss = lambda * CLM + (1 - lambda) * L_fusion (fusion/loss.py), over the sparse fused
distributions that the fuse stage packed; never a dense [batch, length, vocab] teacher.

Checkpoints go to the run's store every `train.checkpoint_every` steps: weights, optimizer,
RNG state and the log. A restarted task resumes from the newest one and continues exactly as
an uninterrupted run would (same data order, same arithmetic). The final model is a Hugging
Face folder (safetensors), committed as `train/model`.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion import models, shards
from fusion.errors import FusionError
from fusion.progress import bar
from fusion.run import Run
from fusion.sparse import SparseRows
from fusion.stages import fuse

NAME = "train"
PART = "model"
CHECKPOINTS = "train/checkpoints"


def parts(run: Run) -> list[str]:
    return [PART]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("fuse", fuse.PART)]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "packed": run.hash("fuse", fuse.PART),
        "target": run.model_identity(run.target.name),
        "train": run.spec.train.model_dump(mode="json", by_alias=True),
    }


def shard_count(run: Run, part: str) -> int:
    return 1


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Packed:
    """All packed blocks of a run, flat: block b owns tokens[ptr[b]:ptr[b+1]] and those rows."""

    tokens: np.ndarray
    ptr: np.ndarray
    rows: SparseRows
    choice: np.ndarray

    @property
    def blocks(self) -> int:
        return len(self.ptr) - 1


def load_packed(run: Run) -> Packed:
    arrays = [fuse.read(run, i) for i in range(fuse.shard_count(run, fuse.PART))]
    tokens = np.concatenate([a["tokens"].astype(np.int64) for a in arrays])
    lengths = np.concatenate([np.diff(a["seq_ptr"]) for a in arrays])
    ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    rows = SparseRows(
        counts=np.concatenate([a["counts"] for a in arrays]).astype(np.int32),
        ids=np.concatenate([a["ids"] for a in arrays]).astype(np.int32),
        logprobs=np.concatenate([a["logprobs"] for a in arrays]).astype(np.float32),
        tail=np.concatenate([a["tail"] for a in arrays]).astype(np.float32),
    )
    choice = np.concatenate([a["choice"] for a in arrays])
    return Packed(tokens, ptr, rows, choice)


def sample_order(blocks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(blocks)


def batch_blocks(step: int, batch_size: int, blocks: int, seed: int) -> list[int]:
    """The blocks of optimizer step `step`: a fixed function of the step, so resuming needs
    nothing but the step number."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, blocks)
        out.append(int(sample_order(blocks, seed, epoch)[pos]))
    return out


def collate(packed: Packed, blocks: list[int], bos: int, pad: int):
    """Tensors for a list of blocks: inputs [B, W+1] (BOS first), labels [B, W] (-100 on
    padding), teacher ids/logprobs [B, W, K] (-1 / -inf padding) and tail [B, W]."""
    import torch

    lengths = [int(packed.ptr[b + 1] - packed.ptr[b]) for b in blocks]
    width = max(lengths)
    k = max(1, max(int(packed.rows.counts[packed.ptr[b] : packed.ptr[b + 1]].max(initial=0)) for b in blocks))
    inputs = np.full((len(blocks), width + 1), pad, dtype=np.int64)
    labels = np.full((len(blocks), width), -100, dtype=np.int64)
    t_ids = np.full((len(blocks), width, k), -1, dtype=np.int64)
    t_lp = np.full((len(blocks), width, k), -np.inf, dtype=np.float32)
    t_tail = np.zeros((len(blocks), width), dtype=np.float32)
    inputs[:, 0] = bos
    for r, (b, n) in enumerate(zip(blocks, lengths)):
        a = packed.ptr[b]
        inputs[r, 1 : n + 1] = packed.tokens[a : a + n]
        labels[r, :n] = packed.tokens[a : a + n]
        ids, lp = packed.rows.slice(a, a + n).padded(k)
        t_ids[r, :n], t_lp[r, :n] = ids, lp
        t_tail[r, :n] = packed.rows.tail[a : a + n]
    mask = np.zeros_like(inputs)
    for r, n in enumerate(lengths):
        mask[r, : n + 1] = 1
    as_t = torch.from_numpy
    return as_t(inputs), as_t(mask), as_t(labels), as_t(t_ids), as_t(t_lp), as_t(t_tail)


# ---- schedule ------------------------------------------------------------------------------------
def learning_rate(step: int, total: int, spec) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def total_steps(blocks: int, spec) -> int:
    return max(1, math.ceil(spec.epochs * blocks / spec.batch_size))


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(run: Run, step: int, model, optimizer, log: list[dict]) -> None:
    import torch

    rel = f"{CHECKPOINTS}/step-{step:07d}"
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, buf)
    run.store.write_bytes(f"{rel}/state.pt", buf.getvalue())
    run.store.write_json(f"{rel}/log.json", log)
    # written last: a checkpoint exists only once `latest.json` names it
    run.store.write_json(f"{CHECKPOINTS}/latest.json", {"step": step, "path": rel, "config_hash": run.hash(NAME, PART)})


def load_checkpoint(run: Run, model, optimizer) -> tuple[int, list[dict]]:
    """Restore the newest checkpoint; returns (next step, log). (0, []) when there is none."""
    import torch

    latest = run.store.read_json(f"{CHECKPOINTS}/latest.json")
    if latest is None:
        return 0, []
    if latest["config_hash"] != run.hash(NAME, PART):
        raise FusionError(
            f"{run.store.uri(CHECKPOINTS)}/latest.json is a checkpoint of config hash {latest['config_hash']}, "
            f"this run's is {run.hash(NAME, PART)}: training settings or data changed; use a new store or --redo train"
        )
    rel = latest["path"]
    state = torch.load(io.BytesIO(run.store.read_bytes(f"{rel}/state.pt")), weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return latest["step"], run.store.read_json(f"{rel}/log.json")


# ---- the task ------------------------------------------------------------------------------------
def run_shard(run: Run, part: str, index: int) -> None:
    import torch

    from fusion.loss import fusion_loss

    spec = run.spec.train
    packed = load_packed(run)
    if packed.blocks == 0:
        raise FusionError("train: the packed data holds no blocks")
    target = run.target
    tokenizer = run.tokenizers[target.name]
    bos = models.context_token_id(target, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    width = models.logit_width(models.model_config(target))
    if int(packed.tokens.max(initial=0)) >= width or int(packed.rows.ids.max(initial=0)) >= width:
        raise FusionError(f"train: packed data holds token ids beyond the target's {width} logits (made for another tokenizer?)")

    torch.manual_seed(spec.seed)
    model = models.load_model(target, "cpu")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(packed.blocks, spec)
    start, log = load_checkpoint(run, model, optimizer)
    micro = spec.micro_batch_size or spec.batch_size
    for step in bar(range(start, steps), desc="train", total=steps - start, unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, spec)
        blocks = batch_blocks(step, spec.batch_size, packed.blocks, spec.seed)
        real = int(sum(packed.ptr[b + 1] - packed.ptr[b] for b in blocks))
        sums = {"loss": 0.0, "clm": 0.0, "fusion": 0.0}
        for m in range(0, len(blocks), micro):
            part_blocks = blocks[m : m + micro]
            inputs, mask, labels, t_ids, t_lp, t_tail = collate(packed, part_blocks, bos, pad)
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
            out = fusion_loss(
                logits, labels, t_ids, t_lp, t_tail, lam=spec.lam, temperature=spec.temperature, kind=spec.loss, tail=spec.tail
            )
            share = float((labels != -100).sum()) / real  # token-weighted mean over the whole batch
            (out["loss"] * share).backward()
            for key in sums:
                sums[key] += float(out[key].detach()) * share
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        choices = np.bincount(packed.choice[blocks], minlength=1 + len(run.fused_sources)).tolist()
        log.append({"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": group["lr"], "tokens": real, "choice": choices})
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(run, step + 1, model, optimizer, log)
    export(run, model, tokenizer, log)


def export(run: Run, model, tokenizer, log: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model.eval()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=0, sort_keys=True) + "\n")
        (out / "README.md").write_text(model_card(run, log))
        shards.write_files_shard(run.store, NAME, PART, 0, out, run.hash(NAME, PART), attrs={"steps": len(log)})


def model_card(run: Run, log: list[dict]) -> str:
    spec = run.spec
    sources = "\n".join(f"- `{s.name}`: {s.path}" for s in run.fused_sources)
    last = log[-1] if log else {}
    return f"""---
library_name: transformers
tags: [knowledge-fusion, fusellm]
---
# {spec.name}: {run.target.name} fused with {len(run.fused_sources)} source model(s)

Continual training of `{run.target.path}` by knowledge fusion (FuseLLM, Wan et al., ICLR 2024).

Sources:
{sources}

Method: alignment `{spec.align.mode}`, fusion `{spec.fuse.function}` at {spec.fuse.level} level by
`{spec.fuse.metric}`, top-{spec.fuse.top_k} fused distributions; loss = {spec.train.lam} * CLM +
{1 - spec.train.lam:g} * {spec.train.loss} (tail: {spec.train.tail}, temperature {spec.train.temperature}).

Data: `{spec.corpus.path}`, blocks of at most {spec.split.block_tokens} tokens.
Training: {len(log)} steps, batch {spec.train.batch_size}, lr {spec.train.lr}; final loss {last.get('loss')}.
"""


def model_folder(run: Run, scratch: Path) -> Path:
    """The committed fused model as a local folder (downloaded if the store is remote)."""
    return shards.read_files_shard(run.store, NAME, PART, 0, scratch)
