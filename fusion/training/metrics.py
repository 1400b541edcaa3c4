"""What the trainer reports: one log entry per step, TensorBoard scalars and a progress record.

The log (train_log.json in the exported model folder, drawn by the eval report) holds per step:
loss, clm, fusion (nats per token, token-weighted over the global batch), lr (read back from the
optimizer), tokens, choice (blocks per candidate MinCE took the teacher from, the target first),
grad_norm, skipped (blocks dropped for bad teacher data). It has no timings, so an interrupted and
resumed run logs exactly what an uninterrupted one does.

TensorBoard (rank 0) gets the same numbers plus throughput, under the run store's
logs/train/tensorboard/:
    loss/total, loss/clm, loss/fusion, lr, grad_norm, data/skipped_blocks,
    choice/<model> (share of the step's blocks), throughput/tokens_per_s
For a local store the events go straight there (watch it live); for a remote one into a scratch
folder uploaded at every checkpoint and at the end. A resumed run purges what the interrupted
one logged after its checkpoint (TensorBoard's purge_step), so curves never double back.

The progress record (rank 0), logs/train/progress.json, is what the controller shows of a
training that runs (fusion/k8s/observe.py: the status ConfigMap and metrics):
    {"config_hash": ..., "step": 120, "steps": 2000, "tokens": 3932160,
     "tokens_per_second": 5120.4, "updated_at": "2026-01-02T03:04:05Z"}
tokens are those trained on so far (a resumed run counts the steps before its checkpoint),
tokens_per_second the rate since the previous record. It is rewritten whole when training
starts, then after a step at most every PROGRESS_SECONDS, and after the last step. Like
everything under logs/, it is no output: nothing that commits, hashes or compares outputs reads it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fusion.errors import FusionError
from fusion.run import Run
from fusion.store import Store
from fusion.training.distributed import World

TENSORBOARD = "logs/train/tensorboard"
PROGRESS = "logs/train/progress.json"
PROGRESS_SECONDS = 10.0  # the least time between two records after steps: fast steps would make a PUT each


def step_entry(
    step: int, sums: dict, tokens: int, lr: float, choice: list[int], grad_norm: float, skipped: int
) -> dict:
    return {
        "step": step,
        "loss": sums["loss"],
        "clm": sums["clm"],
        "fusion": sums["fusion"],
        "lr": lr,
        "tokens": tokens,
        "choice": choice,
        "grad_norm": grad_norm,
        "skipped": skipped,
    }


@dataclass
class Board:
    writer: object  # torch.utils.tensorboard.SummaryWriter
    folder: Path
    remote: bool  # upload `folder` to the store at sync


def open_board(run: Run, world: World, scratch: Path, start_step: int) -> Board | None:
    if not world.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard comes with the `train` extra; the CPU image and a bare install lack it
        print("[fusion] train: tensorboard is not installed (pip install 'fusion-llm[train]'): no TensorBoard "
              "curves; every step is still logged in the model's train_log.json", file=sys.stderr, flush=True)
        return None

    if start_step == 0:
        run.store.remove(TENSORBOARD)  # a fresh start: curves of an earlier run would mislead
    local = run.store.local_path(TENSORBOARD)
    folder = local if local is not None else scratch / "tensorboard"
    folder.mkdir(parents=True, exist_ok=True)
    return Board(SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None), folder, local is None)


def write(board: Board | None, entry: dict, names: list[str], seconds: float, skipped_total: int) -> None:
    if board is None:
        return
    w, step = board.writer, entry["step"]
    for key in ("loss", "clm", "fusion"):
        w.add_scalar(f"loss/{'total' if key == 'loss' else key}", entry[key], step)
    w.add_scalar("lr", entry["lr"], step)
    w.add_scalar("grad_norm", entry["grad_norm"], step)
    w.add_scalar("data/skipped_blocks", skipped_total, step)
    blocks = max(1, sum(entry["choice"]))
    for name, count in zip(names, entry["choice"]):
        w.add_scalar(f"choice/{name}", count / blocks, step)
    w.add_scalar("throughput/tokens_per_s", entry["tokens"] / max(seconds, 1e-9), step)


def sync(run: Run, board: Board | None) -> None:
    """Make the store's copy current (a checkpoint or the end of training)."""
    if board is None:
        return
    board.writer.flush()
    if board.remote:
        for f in sorted(board.folder.rglob("*")):
            if f.is_file():
                run.store.put_file(f, f"{TENSORBOARD}/{f.relative_to(board.folder).as_posix()}")


def close(run: Run, board: Board | None) -> None:
    if board is not None:
        sync(run, board)
        board.writer.close()


# ---- the progress record ------------------------------------------------------------------------
class Progress:
    """Rank 0 writes the progress record (see the module docstring); other ranks only count."""

    def __init__(self, run: Run, world: World, steps: int, done: list[dict]):
        self.store = run.store if world.main else None
        self.config_hash = run.hash("train", "model")
        self.steps = steps
        self.step = len(done)
        self.tokens = sum(e["tokens"] for e in done)
        self.written_at, self.written_tokens = time.monotonic(), self.tokens
        self.write(0.0)

    def stepped(self, entry: dict) -> None:
        self.step, self.tokens = entry["step"], self.tokens + entry["tokens"]
        now = time.monotonic()
        if self.step == self.steps or now - self.written_at >= PROGRESS_SECONDS:
            self.write((self.tokens - self.written_tokens) / max(now - self.written_at, 1e-9))
            self.written_at, self.written_tokens = now, self.tokens

    def write(self, tokens_per_second: float) -> None:
        if self.store is None:
            return
        record = {
            "config_hash": self.config_hash,
            "step": self.step,
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_second": round(tokens_per_second, 1),
            "updated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.store.write_json(PROGRESS, record)


def read_progress(store: Store, config_hash: str) -> dict | None:
    """The progress record if it is this training's (one an earlier run of other settings left
    is not), else None."""
    try:
        record = store.read_json(PROGRESS)
    except FusionError:  # not JSON: the status shows no progress rather than stop the controller
        return None
    if not isinstance(record, dict) or record.get("config_hash") != config_hash:
        return None
    return record
