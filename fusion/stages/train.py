"""train: continual training of the target on the packed blocks.

loss = lambda * CLM + (1 - lambda) * L_fusion (fusion/loss.py), over the sparse fused
distributions that the fuse stage packed; never a dense [batch, length, vocab] teacher.

The recipe, top to bottom (its parts live in fusion/training/):
    setup       the process world, the data of this rank, the engine (plain torch, or DeepSpeed
                ZeRO-2/3), the newest checkpoint if there is one
    train_step  this rank's share of the global batch in micro-batches: forward, fusion loss,
                backward; the ranks sum their token counts and losses; the optimizer steps
    checkpoint  every `train.checkpoint_every` steps and on SIGTERM, into the run's store;
                a restarted task continues exactly as an uninterrupted run would
    export      the fused model as a Hugging Face folder (safetensors, tokenizer, model card,
                train_log.json), committed as `train/model`

Launch: `fusion run SPEC` trains in one process (train.engine=torch, or deepspeed with a world
of one). Several processes or nodes: every node runs `torchrun ... -m fusion train SPEC`
(fusion.training.distributed.launch starts it from the PyTorchJob's environment), train.engine=deepspeed.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from fusion import models, shards
from fusion.errors import FusionError, PeersLost
from fusion.progress import bar
from fusion.run import Run
from fusion.stages import Stage
from fusion.stages import fuse
from fusion.training import checkpoint, data, distributed, engine, metrics

NAME = "train"
PART = "model"
ENGINE_LOG = "logs/train/engine.json"


def parts(run: Run) -> list[str]:
    return [PART]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return [("fuse", fuse.PART)]


def fingerprint(run: Run, part: str) -> dict:
    return {
        "packed": run.hash("fuse", fuse.PART),
        "target": run.model_identity(run.target.name),
        "train": run.spec.train.fingerprint(),
    }


def shard_count(run: Run, part: str) -> int:
    return 1


def run_shard(run: Run, part: str, index: int) -> None:
    world = distributed.init(engine.engine_of(run.spec.train))
    stop, previous_handler = checkpoint.watch_sigterm()
    lost = False
    try:
        with tempfile.TemporaryDirectory(prefix=f"fusion-train-rank{world.rank}-") as scratch:
            with distributed.peers_lost_exit(world):
                train(run, world, stop, Path(scratch))
    except PeersLost:
        lost = True
        raise
    finally:
        checkpoint.unwatch_sigterm(previous_handler)
        distributed.close(world, peers_lost=lost)


# ---- setup and the step loop ---------------------------------------------------------------------
def train(run: Run, world: distributed.World, stop, scratch: Path) -> None:
    """Train this rank from the packed set streamed by its reader (whose threads always stop)."""
    reader = data.PackedReader.for_run(run, world.rank, world.size)
    try:
        train_from(run, world, stop, scratch, reader)
    finally:
        reader.close()


def train_from(run: Run, world: distributed.World, stop, scratch: Path, reader: data.PackedReader) -> None:
    spec = run.spec.train
    steps = reader.steps(spec.epochs)
    eng = engine.build(run, world, steps)
    state = checkpoint.load(run, world, eng, reader, scratch)
    board = metrics.open_board(run, world, scratch, state.step)
    progress = metrics.Progress(run, world, steps, state.log)
    if world.main:
        applied = eng.describe()
        run.store.write_json(ENGINE_LOG, applied)
        print(
            f"[fusion] train: {eng.kind} engine, {world.size} rank(s), {eng.precision}, {steps} steps from step "
            f"{state.step}; optimizer {applied['optimizer']['class']}, schedule {applied['schedule']['shape']} "
            f"(details: {run.store.uri(ENGINE_LOG)})",
            flush=True,
        )
        if spec.lanes % world.size:
            print(
                f"[fusion] train: train.lanes={spec.lanes} is not a multiple of the {world.size} ranks: ranks fetch "
                f"shards they share with others (set train.lanes to a multiple of the world size for new runs)",
                file=sys.stderr,
                flush=True,
            )

    names = [run.target.name] + [s.name for s in run.fused_sources]
    loop = range(state.step, steps)
    for step in bar(loop, desc="train", unit="step") if world.main else loop:
        started = time.perf_counter()
        entry, preempted = train_step(run, eng, reader, step, stop, len(names))
        state.step, state.skipped = step + 1, state.skipped + entry["skipped"]
        state.log.append(entry)
        if state.skipped > spec.max_skipped_blocks:
            raise FusionError(
                f"train: {state.skipped} blocks skipped for non-finite teacher data, more than "
                f"train.max_skipped_blocks={spec.max_skipped_blocks}: the packed data (fuse/train) looks corrupt"
            )
        metrics.write(board, entry, names, time.perf_counter() - started, state.skipped)
        progress.stepped(entry)
        if preempted or (state.step % spec.checkpoint_every == 0 and state.step < steps):
            checkpoint.save(run, world, eng, reader, state, scratch)
            metrics.sync(run, board)
        if preempted:
            metrics.close(run, board)
            if world.main:
                message = f"[fusion] train: SIGTERM; checkpoint of step {state.step} saved, exiting"
                print(message, file=sys.stderr, flush=True)
            raise SystemExit(checkpoint.PREEMPTED_EXIT_CODE)
    metrics.close(run, board)
    export(run, eng, state)


def train_step(run: Run, eng: engine.Engine, reader: data.PackedReader, step: int, stop, candidates: int) -> tuple[dict, bool]:
    """One optimizer step over the global batch; returns its log entry and whether the ranks
    agreed to stop (SIGTERM on any rank)."""
    from fusion.loss import fusion_loss

    spec, world = run.spec.train, eng.world
    batches = reader.step_batches(step)
    if len(batches) != eng.layout.accumulation:
        raise RuntimeError(f"the reader made {len(batches)} micro-batches, the engine expects {eng.layout.accumulation}")
    for batch in batches:
        for where in batch.skipped:
            print(f"[fusion] train: skipped {where}: non-finite teacher data", file=sys.stderr, flush=True)
    choice = [sum(b.choice[c] for b in batches) for c in range(candidates)]
    counts = distributed.all_sum(world, [sum(b.tokens for b in batches), sum(len(b.skipped) for b in batches), *choice])
    tokens, skipped, choice = int(counts[0]), int(counts[1]), [int(c) for c in counts[2:]]

    lr = eng.current_lr()
    sums = [0.0, 0.0, 0.0]
    for i, batch in enumerate(batches):
        logits = eng.forward(batch)
        dev = logits.device
        out = fusion_loss(
            logits,
            batch.labels.to(dev),
            batch.teacher_ids.to(dev),
            batch.teacher_logprobs.to(dev),
            batch.teacher_tail.to(dev),
            lam=spec.lam,
            temperature=spec.temperature,
            kind=spec.loss,
            tail=spec.tail,
            reduction="sum",
        )
        # a share of the global token-weighted mean; summed over micro-batches and ranks
        eng.backward(out["loss"] / max(tokens, 1), last=i == len(batches) - 1)
        for j, key in enumerate(("loss", "clm", "fusion")):
            sums[j] += float(out[key].detach())
    totals = distributed.all_sum(world, [*sums, float(stop.is_set())])
    mean = {key: totals[j] / max(tokens, 1) for j, key in enumerate(("loss", "clm", "fusion"))}
    if not math.isfinite(mean["loss"]):
        raise FusionError(
            f"train: the loss is not finite at step {step + 1} (diverged: lower train.lr or check the packed data); "
            f"the newest checkpoint is intact"
        )
    grad_norm = eng.step()
    entry = metrics.step_entry(step + 1, mean, tokens, lr, choice, grad_norm, skipped)
    return entry, totals[3] > 0


# ---- export --------------------------------------------------------------------------------------
def export(run: Run, eng: engine.Engine, state: checkpoint.TrainerState) -> None:
    """The fused model as a Hugging Face folder, in the target's dtype, committed by rank 0.
    Every rank takes part in gathering the weights (ZeRO-3 holds them in slices)."""
    import torch

    weights = eng.full_state_dict()
    if eng.world.main:
        dtype = models.torch_dtype(run.target.dtype)
        weights = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in weights.items()}
        tokenizer = run.tokenizers[run.target.name]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            eng.module.config.use_cache = True
            eng.module.save_pretrained(out, state_dict=weights)
            models.save_tokenizer(tokenizer, out, models.context_token_id(run.target, tokenizer))
            (out / "train_log.json").write_text(json.dumps(state.log, indent=0, sort_keys=True) + "\n")
            (out / "README.md").write_text(model_card(run, eng, state))
            attrs = {"steps": len(state.log), "skipped_blocks": state.skipped}
            shards.write_files_shard(run.store, NAME, PART, 0, out, run.hash(NAME, PART), attrs=attrs)
    distributed.barrier(eng.world)


def model_card(run: Run, eng: engine.Engine, state: checkpoint.TrainerState) -> str:
    spec, log = run.spec, state.log
    sources = "\n".join(f"- `{s.name}`: {s.path}" for s in run.fused_sources)
    names = [run.target.name] + [s.name for s in run.fused_sources]
    chosen = [sum(e["choice"][i] for e in log) for i in range(len(names))]
    shares = ", ".join(f"`{n}` {c / max(1, sum(chosen)):.1%}" for n, c in zip(names, chosen))
    teacher = teacher_line(spec.fuse.function, spec.fuse.level, shares)
    last = log[-1] if log else {}
    engine_line = f"{eng.kind}" + (f" ZeRO-{eng.zero_stage}" if eng.zero_stage is not None else "")
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
{teacher}

Data: `{spec.corpus.path}`, blocks of at most {spec.split.block_tokens} tokens; {sum(e["tokens"] for e in log)} target
tokens trained on, {state.skipped} block(s) skipped for bad teacher data.
Training: {len(log)} steps, batch {spec.train.batch_size}, AdamW lr {spec.train.lr}
(warm-up {spec.train.warmup_steps} steps, cosine to {spec.train.min_lr_ratio:g} x),
{engine_line} on {eng.world.size} rank(s), {eng.precision}; final loss {last.get('loss')}.
"""


def teacher_line(function: str, level: str, shares: str) -> str:
    """What the per-block choice counts mean: the teacher only where MinCE picks one per block."""
    if function == "mince" and level == "sequence":
        return f"Teacher taken from (blocks seen in training): {shares}."
    how = "weights every candidate by its cross-entropy" if function == "avgce" else "picks a candidate per token"
    return (f"Lowest-cost candidate per block (blocks seen in training): {shares}; the {function} fusion at "
            f"{level} level {how}, so no block has a single teacher.")


def model_folder(run: Run, scratch: Path) -> Path:
    """The committed fused model as a local folder (downloaded if the store is remote)."""
    return shards.read_files_shard(run.store, NAME, PART, 0, scratch)


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard)
