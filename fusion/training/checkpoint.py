"""Checkpoints in the run's store, resuming from them, and preemption (SIGTERM).

    train/checkpoints/step-0000040/engine/...       engine state files of every rank
    train/checkpoints/step-0000040/rank-00001.pt    one rank's data position and RNG states
    train/checkpoints/step-0000040/trainer.json     the step log so far and the skipped blocks
    train/checkpoints/step-0000040/writer.json      who writes it (run id, config hash): written first
    train/checkpoints/latest.json                   names the newest complete checkpoint

Saving: every rank writes its engine state into a local scratch folder and uploads the files
(names never collide: DeepSpeed puts the rank into each file name), then rank 0 writes
trainer.json and, once every rank is done, latest.json. latest.json is the commit: a process
killed at any moment leaves it naming a complete checkpoint. Checkpoints beyond the newest
`train.keep_checkpoints` are deleted afterwards, but only those whose writer.json names this
trainer's run and config: a trainer never deletes checkpoints it did not write.

Resuming: every rank fetches the engine files it needs (of DeepSpeed's `zero_pp_rank_N_` files
only its own), restores its RNG states and data position, and the run continues exactly as an
uninterrupted one (bitwise on CPU). A checkpoint of another config hash is refused, and so is a
DeepSpeed checkpoint of another world size (ZeRO partitions are per rank).

Preemption: Kubernetes sends SIGTERM to the pod's torchrun, which forwards it to its workers and
waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before SIGKILL. The workers note it,
agree on it at the end of the current step, write a checkpoint and exit with
PREEMPTED_EXIT_CODE. The pod's terminationGracePeriodSeconds must cover one step and one save.
"""

from __future__ import annotations

import io
import random
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion.errors import FusionError
from fusion.run import Run
from fusion.training import distributed, engine
from fusion.training.distributed import World

CHECKPOINTS = "train/checkpoints"
LATEST = f"{CHECKPOINTS}/latest.json"
WRITER = "writer.json"  # in each checkpoint, written first: who writes it (`writer`)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what the pod would report had it been killed by it


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    log: list[dict] = field(default_factory=list)  # one entry per step (metrics.step_entry)
    skipped: int = 0  # blocks skipped for bad teacher data


def step_dir(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ---- RNG states ------------------------------------------------------------------------------------
def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save ------------------------------------------------------------------------------------------
def save(run: Run, world: World, eng: engine.Engine, reader, state: TrainerState, scratch: Path) -> None:
    """Write a checkpoint of `state.step` (every rank calls this)."""
    import torch

    store, rel = run.store, step_dir(state.step)
    if world.main:
        if not is_mine(run, state.step, missing_is_mine=True):
            raise FusionError(f"{store.uri(rel)}: written by another run ({store.read_json(f'{rel}/{WRITER}')}); not overwritten")
        store.remove(rel)  # debris of a save of ours that was killed before its latest.json
        store.write_json(f"{rel}/{WRITER}", writer(run))  # first: whatever lands here after is known to be ours
    distributed.barrier(world)
    local = scratch / f"save-{state.step}"
    eng.save(local / "engine")
    for f in sorted(p for p in (local / "engine").rglob("*") if p.is_file()):
        store.put_file(f, f"{rel}/engine/{f.relative_to(local / 'engine').as_posix()}")
    buf = io.BytesIO()
    torch.save({"data": reader.state_dict(), "rng": rng_state()}, buf)
    store.write_bytes(f"{rel}/{rank_file(world.rank)}", buf.getvalue())
    _remove_tree(local)
    if world.main:
        store.write_json(f"{rel}/trainer.json", {"step": state.step, "log": state.log, "skipped": state.skipped})
    distributed.barrier(world)
    if world.main:
        store.write_json(
            LATEST,
            {
                "step": state.step,
                "path": rel,
                "config_hash": run.hash("train", "model"),
                "engine": eng.kind,
                "world_size": world.size,
            },
        )
        prune(run, state.step, run.spec.train.keep_checkpoints)


def writer(run: Run) -> dict:
    """Who writes a checkpoint: the run (its run id, fusion/ownership.py) and the config hash of
    its training. A trainer deletes only checkpoints that name it."""
    return {"run_id": run.owner()["run_id"], "config_hash": run.hash("train", "model")}


def is_mine(run: Run, step: int, missing_is_mine: bool = False) -> bool:
    found = run.store.read_json(f"{step_dir(step)}/{WRITER}")
    return missing_is_mine if found is None else found == writer(run)


def prune(run: Run, latest: int, keep: int) -> None:
    """Delete this trainer's checkpoints older than the newest `keep`, and any of its own newer
    than latest.json (debris). Checkpoints another writer left (or one without writer.json,
    written before writers were recorded) are never deleted."""
    steps = sorted(int(m.group(1)) for name in run.store.list(CHECKPOINTS) if (m := re.fullmatch(r"step-(\d+)", name)))
    kept = [s for s in steps if s <= latest][-keep:]
    for s in steps:
        if s not in kept and is_mine(run, s):
            run.store.remove(step_dir(s))


# ---- load ------------------------------------------------------------------------------------------
def load(run: Run, world: World, eng: engine.Engine, reader, scratch: Path) -> TrainerState:
    """Restore the newest checkpoint into the engine, the reader and the RNGs; a fresh
    TrainerState when there is none."""
    import torch

    latest = run.store.read_json(LATEST)
    if latest is None:
        return TrainerState()
    where = run.store.uri(LATEST)
    if latest.get("config_hash") != run.hash("train", "model"):
        raise FusionError(
            f"{where} is a checkpoint of config hash {latest.get('config_hash')}, this run's is "
            f"{run.hash('train', 'model')}: training settings or data changed; use a new store or --redo train"
        )
    if latest.get("engine") != eng.kind:
        raise FusionError(
            f"{where} was written by the {latest.get('engine')} engine, this run uses {eng.kind}; use --redo train"
        )
    if eng.state_per_rank and latest.get("world_size") != world.size:
        raise FusionError(
            f"{where} was written by {latest.get('world_size')} ranks, this job has {world.size}: ZeRO partitions are "
            f"per rank; run with {latest.get('world_size')} ranks or --redo train"
        )
    rel = latest["path"]
    eng.load(_fetch_engine_files(run, f"{rel}/engine", world.rank, scratch / "resume"))
    blob = run.store.read_bytes(f"{rel}/{rank_file(world.rank)}")
    if blob is None:
        raise FusionError(f"{run.store.uri(rel)}: no {rank_file(world.rank)} (incomplete checkpoint)")
    mine = torch.load(io.BytesIO(blob), weights_only=False)
    reader.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    trainer = run.store.read_json(f"{rel}/trainer.json")
    _remove_tree(scratch / "resume")
    return TrainerState(step=trainer["step"], log=trainer["log"], skipped=trainer["skipped"])


def _fetch_engine_files(run: Run, rel: str, rank: int, local: Path) -> Path:
    """The engine folder as a local path: the store's own folder for local stores, else a
    download of the files this rank needs."""
    direct = run.store.local_path(rel)
    if direct is not None:
        return direct
    for name in run.store.find(rel):
        m = re.search(r"zero_pp_rank_(\d+)_", Path(name).name)
        if m and int(m.group(1)) != rank:
            continue  # another rank's ZeRO partition
        run.store.get_file(f"{rel}/{name}", local / name)
    return local


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---- preemption --------------------------------------------------------------------------------------
def watch_sigterm() -> tuple[threading.Event, object]:
    """An event set by SIGTERM, and the previous handler (to restore with `unwatch_sigterm`)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return stop, previous


def unwatch_sigterm(previous) -> None:
    signal.signal(signal.SIGTERM, previous)
