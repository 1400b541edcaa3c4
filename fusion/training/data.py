"""The packed training set (the fuse stage's shards), streamed from the run's store to the trainer.

    reader = PackedReader.for_run(run, rank=world.rank, world_size=world.size)
    reader.load_state_dict(saved)                  # to resume (optional)
    for step in range(start, reader.steps(epochs)):
        for batch in reader.step_batches(step):    # this rank's micro-batches of the step
            ... batch.inputs, batch.mask, batch.labels, batch.teacher_ids, ...
        saved = reader.state_dict()

This is the trainer's only way to the data: nothing holds the whole packed set in memory.

Order. Optimizer step s trains on the blocks at positions s*B .. s*B + B - 1 (B = batch_size)
of an endless sequence of epochs. Each epoch is drawn from (seed, epoch): the shards are
shuffled and their blocks, in that order, are cut into `lanes` contiguous streams of equal
length (within one block); each stream is cut into windows of about `window_shards` shards'
worth of blocks and the blocks of each window are shuffled. Position i of the epoch is the
next block of stream i mod lanes. The order depends on the data, seed, lanes and window only.

Ranks. Rank r of W trains on positions r, r + W, r + 2W, ... of each global batch, so the
global batches are the same for one process, two processes or two nodes. When W divides
`lanes`, the positions of rank r come from lanes r, r + W, ... (shifted by the epoch's length
modulo W at each new epoch): each rank fetches and decodes only the shards of its own lanes,
a 1/W share of the packed set per epoch. (Other world sizes still train correctly; their
ranks then fetch shards they share with others.)

Memory. A rank holds the decoded shards of the steps ahead of it, at most `budget_shards`
(its lanes' current windows and the next ones), however large the packed set; besides, 16
bytes per block of order and index (`fusion plan` gives a run's blocks: about 1.3 million
for jobs/fusellm-minipile.yaml, so about 20 MB).

Prefetch. A pool of threads downloads and decodes the shards of upcoming steps, in the order
they will be needed, up to the budget; a background thread collates the next micro-batches
into tensors while the trainer computes. The trainer waits only when the store is slower than
training.

Position. `state_dict()` is the step (and micro-batch) after the last batch handed out, plus
what fixes the order (seed, batch size, lanes, window, blocks); `load_state_dict` checks those
and continues exactly there, mid-shard or mid-window alike.

Validation. Opening the reader checks every shard's commit record (config hash, the target
tokenizer it was packed for); a block whose ids lie outside the target's logits, or that names
a fused candidate this run does not have, is an error naming the block; a block with
non-finite teacher data keeps its place in the batch (the same shapes and collectives on every
rank) but carries no loss, and is reported in `Batch.skipped`.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fusion import encoding, shards
from fusion.errors import FusionError
from fusion.stages import fuse
from fusion.store import Store

STAGE, PART = fuse.NAME, fuse.PART


# ---- one decoded shard -----------------------------------------------------------------------------
@dataclass
class Shard:
    """A decoded fuse shard: block b owns tokens[ptr[b]:ptr[b+1]] and their teacher rows, whose
    entries start at entry_ptr[b]."""

    index: int
    tokens: np.ndarray
    ptr: np.ndarray  # int64 [blocks + 1]
    counts: np.ndarray  # entries per row
    entry_ptr: np.ndarray  # int64 [blocks + 1]
    ids: np.ndarray
    logprobs: np.ndarray  # float16
    tail: np.ndarray  # float16
    choice: np.ndarray

    @classmethod
    def from_decoded(cls, index: int, arrays: dict[str, np.ndarray]) -> Shard:
        """From fuse.decode's arrays (the one decoder of the packed format)."""
        ptr = arrays["seq_ptr"]
        counts = arrays["counts"].astype(np.uint8 if int(arrays["counts"].max(initial=0)) < 256 else np.int32)
        entries = encoding.row_ptr(arrays["counts"].astype(np.int64))
        return cls(
            index, arrays["tokens"], ptr, counts, entries[ptr], arrays["ids"], arrays["logprobs"],
            arrays["tail"], arrays["choice"],
        )

    @property
    def blocks(self) -> int:
        return len(self.ptr) - 1

    def where(self, block: int) -> str:
        return f"{shards.part_dir(STAGE, PART)}/{shards.shard_name(self.index)} block {block}"


def read_shard(store: Store, index: int, config_hash: str | None) -> Shard:
    stored = shards.read_shard(store, STAGE, PART, index, config_hash=config_hash)
    return Shard.from_decoded(index, fuse.decode(stored))


# ---- the order ---------------------------------------------------------------------------------------
def epoch_order(blocks_per_shard, seed: int, epoch: int, lanes: int, window_shards: int) -> np.ndarray:
    """The global block indices of one epoch in training order (module doc: Order). Block
    indices count the shards' blocks in shard order."""
    counts = np.asarray(blocks_per_shard, dtype=np.int64)
    first = encoding.row_ptr(counts)
    total = int(first[-1])
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    sizes = counts[shard_order]
    start_of = np.repeat(first[shard_order] - encoding.row_ptr(sizes)[:-1], sizes)
    sequence = np.arange(total, dtype=np.int64) + start_of  # every block, shards in shuffled order
    window = max(1, window_shards * math.ceil(total / max(1, len(counts))))
    order = np.empty(total, dtype=np.int64)
    base, extra = divmod(total, lanes)
    begin = 0
    for lane in range(lanes):
        stream = sequence[begin : begin + base + (lane < extra)]
        begin += len(stream)
        for k, a in enumerate(range(0, len(stream), window)):
            piece = stream[a : a + window]
            stream[a : a + window] = piece[np.random.default_rng([seed, epoch, lane, k]).permutation(len(piece))]
        order[lane::lanes] = stream
    return order


# ---- batches as tensors --------------------------------------------------------------------------------
@dataclass
class Batch:
    step: int  # the optimizer step this micro-batch belongs to
    micro: int  # its index among this rank's micro-batches of the step
    last: bool  # the step's last micro-batch on this rank
    blocks: np.ndarray  # global block indices
    inputs: object  # [B, W+1] token ids, BOS first (padding: pad id)
    mask: object  # [B, W+1] attention mask
    labels: object  # [B, W] (-100: no loss)
    teacher_ids: object  # [B, W, K] int64 (-1: padding)
    teacher_logprobs: object  # [B, W, K] float32 (-inf: padding)
    teacher_tail: object  # [B, W] float32
    tokens: int  # positions with a loss
    choice: list[int]  # blocks per MinCE winner (index 0: the target)
    skipped: list[str]  # blocks dropped for non-finite teacher data


def bad_teacher_data(logprobs: np.ndarray, tail: np.ndarray) -> bool:
    return bool(np.isnan(logprobs).any() or np.isposinf(logprobs).any() or not np.isfinite(tail).all() or (tail < 0).any())


def collate(parts: list[tuple[Shard, int]], bos: int, pad: int, width: int, candidates: int) -> dict:
    """Tensors of the blocks `parts` ((shard, block within it) each), as Batch's fields from
    `inputs` on. Errors and skipping: module doc, Validation."""
    import torch

    spans = []
    for s, j in parts:
        a, z = int(s.ptr[j]), int(s.ptr[j + 1])
        ea, ez = int(s.entry_ptr[j]), int(s.entry_ptr[j + 1])
        for name, ids in (("token", s.tokens[a:z]), ("teacher", s.ids[ea:ez])):
            if len(ids) and int(ids.max()) >= width:
                raise FusionError(
                    f"train: {s.where(j)} holds {name} id {int(ids.max())} but the target has {width} logits "
                    f"(packed for another tokenizer or vocabulary?)"
                )
        if not 0 <= int(s.choice[j]) < candidates:
            raise FusionError(
                f"train: {s.where(j)} names candidate {int(s.choice[j])}, but this run has {candidates} (target + sources)"
            )
        spans.append((a, z, ea, ez, bad_teacher_data(s.logprobs[ea:ez], s.tail[a:z])))
    n, longest = len(parts), max(z - a for a, z, *_ in spans)
    k = max(1, max(int(s.counts[a:z].max(initial=0)) for (s, _), (a, z, *_) in zip(parts, spans)))
    inputs = np.full((n, longest + 1), pad, dtype=np.int64)
    mask = np.zeros((n, longest + 1), dtype=np.int64)
    labels = np.full((n, longest), -100, dtype=np.int64)
    t_ids = np.full((n, longest, k), -1, dtype=np.int64)
    t_lp = np.full((n, longest, k), -np.inf, dtype=np.float32)
    t_tail = np.zeros((n, longest), dtype=np.float32)
    inputs[:, 0] = bos
    for r, ((s, _), (a, z, ea, ez, bad)) in enumerate(zip(parts, spans)):
        length = z - a
        inputs[r, 1 : length + 1] = s.tokens[a:z]
        mask[r, : length + 1] = 1
        if bad:
            continue
        labels[r, :length] = s.tokens[a:z]
        counts = s.counts[a:z].astype(np.int64)
        row = np.repeat(np.arange(length), counts)
        col = np.arange(ez - ea) - np.repeat(encoding.row_ptr(counts)[:-1], counts)
        t_ids[r, row, col] = s.ids[ea:ez]
        t_lp[r, row, col] = s.logprobs[ea:ez]
        t_tail[r, :length] = s.tail[a:z]
    as_t = torch.from_numpy
    choice = np.bincount([int(s.choice[j]) for s, j in parts], minlength=candidates).tolist()
    return {
        "inputs": as_t(inputs), "mask": as_t(mask), "labels": as_t(labels), "teacher_ids": as_t(t_ids),
        "teacher_logprobs": as_t(t_lp), "teacher_tail": as_t(t_tail), "tokens": int((labels != -100).sum()),
        "choice": choice, "skipped": [s.where(j) for (s, j), span in zip(parts, spans) if span[4]],
    }


# ---- the reader ------------------------------------------------------------------------------------------
class PackedReader:
    def __init__(
        self,
        store: Store,
        *,
        batch_size: int,
        seed: int,
        bos: int,
        pad: int,
        width: int,
        candidates: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        lanes: int = 8,
        window_shards: int = 1,
        budget_shards: int | None = None,
        prefetch_batches: int = 4,
        fetch_threads: int = 4,
        config_hash: str | None = None,
        target_tokenizer: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise FusionError(f"train: rank {rank} is not within world size {world_size}")
        if batch_size % world_size:
            raise FusionError(f"train.batch_size={batch_size} is not divisible by the world size {world_size}")
        self.store, self.config_hash = store, config_hash
        self.batch_size, self.seed, self.bos, self.pad = batch_size, seed, bos, pad
        self.width, self.candidates = width, candidates
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size // world_size
        self.micro = micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise FusionError(
                f"train.micro_batch_size={self.micro} does not divide the {self.per_rank} blocks per rank "
                f"(train.batch_size={batch_size} over {world_size} rank(s))"
            )
        self.lanes, self.window = lanes, window_shards
        self.prefetch_batches, self.fetch_threads = max(1, prefetch_batches), max(1, fetch_threads)
        self.blocks_per_shard = self._check_records(target_tokenizer)
        self.first = encoding.row_ptr(self.blocks_per_shard)
        self.blocks = int(self.first[-1])
        if self.blocks == 0:
            raise FusionError(f"train: {store.uri(shards.part_dir(STAGE, PART))} holds no blocks")
        own_lanes = lanes // math.gcd(lanes, world_size)
        self.budget = budget_shards or max(2, own_lanes * 2 * (window_shards + 1))
        self._orders: dict[int, np.ndarray] = {}
        self._position = (0, 0)  # the next (step, micro-batch) to hand out
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(cls, run, rank: int = 0, world_size: int = 1, **kwargs) -> PackedReader:
        """The reader of a run's train stage: its batch sizes, seed, order settings, the
        target's BOS, pad and logit width; packed data checked against the run."""
        from fusion import models

        spec, target = run.spec.train, run.target
        tokenizer = run.tokenizers[target.name]
        bos = models.context_token_id(target, tokenizer)
        settings = {
            "batch_size": spec.batch_size, "micro_batch_size": spec.micro_batch_size, "seed": spec.seed,
            "lanes": spec.lanes, "window_shards": spec.window_shards, "bos": bos,
            "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos,
            "width": models.logit_width(models.model_config(target)), "candidates": 1 + len(run.fused_sources),
            "config_hash": run.hash(STAGE, PART), "target_tokenizer": run.tokenizer_hash(target.name),
        }
        return cls(run.store, rank=rank, world_size=world_size, **{**settings, **kwargs})

    def _check_records(self, target_tokenizer: str | None) -> np.ndarray:
        """Blocks per shard, from the commit records (no array is read); refuses packed data of
        another config or another target tokenizer before any training."""
        store, where = self.store, self.store.uri(shards.part_dir(STAGE, PART))
        committed = store.read_json(f"{shards.part_dir(STAGE, PART)}/{shards.COMMITTED}")
        if committed is None:
            raise FusionError(f"train: {where} is not committed (run the fuse stage first)")
        if self.config_hash is not None and committed.get("config_hash") != self.config_hash:
            raise FusionError(
                f"train: {where} was committed with config hash {committed.get('config_hash')}, this run's is "
                f"{self.config_hash}: the fuse settings (or an earlier stage's) changed; re-run fuse"
            )

        def blocks(i: int) -> int:
            record = shards.read_record(store, STAGE, PART, i, self.config_hash)
            rel = shards.record_path(STAGE, PART, i)
            if record is None or "arrays" not in record or "seq_len" not in record["arrays"]:
                raise FusionError(f"train: {store.uri(rel)}: not a committed packed shard")
            packed_for = record["attrs"].get("target_tokenizer")
            if target_tokenizer is not None and packed_for is not None and packed_for != target_tokenizer:
                raise FusionError(
                    f"train: {store.uri(rel)} was packed for a target tokenizer with hash {packed_for}, this run's "
                    f"target has {target_tokenizer}: made for another target; re-run fuse for this one"
                )
            return int(record["arrays"]["seq_len"]["shape"][0])

        with ThreadPoolExecutor(8) as pool:
            return np.array(list(pool.map(blocks, range(int(committed["shards"])))), dtype=np.int64)

    def steps(self, epochs: float) -> int:
        """Optimizer steps in `epochs` passes over the data."""
        return max(1, math.ceil(epochs * self.blocks / self.batch_size))

    # ---- order ----------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self.blocks_per_shard, self.seed, epoch, self.lanes, self.window)
        return self._orders[epoch]

    def _blocks_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(positions, self.blocks)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            here = epochs == e
            out[here] = self._order(int(e))[within[here]]
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """The global block indices of an optimizer step (all ranks)."""
        return self._blocks_at(np.arange(step * self.batch_size, (step + 1) * self.batch_size))

    def rank_blocks(self, first_step: int, steps: int) -> np.ndarray:
        """[steps, per_rank]: this rank's blocks of steps first_step .. first_step + steps - 1."""
        slots = np.arange(self.rank, self.batch_size, self.world_size)
        positions = (np.arange(first_step, first_step + steps)[:, None] * self.batch_size + slots[None, :]).ravel()
        return self._blocks_at(positions).reshape(steps, self.per_rank)

    def shard_of(self, blocks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, blocks, side="right") - 1

    # ---- position -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        step, micro = self._position
        return {
            "step": step, "micro": micro, "micro_batch_size": self.micro, "seed": self.seed,
            "batch_size": self.batch_size, "lanes": self.lanes, "window_shards": self.window, "blocks": self.blocks,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "lanes", "window_shards", "blocks"):
            if state.get(key) != mine[key]:
                raise FusionError(f"train: the saved data position has {key}={state.get(key)!r}, this reader {mine[key]!r}")
        micro = int(state.get("micro", 0))
        if micro and state.get("micro_batch_size") != self.micro:
            raise FusionError("train: the data position was saved within a step with another micro_batch_size")
        self.close()
        self._position = (int(state["step"]), micro)

    # ---- iteration ------------------------------------------------------------------------------------
    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of `step`, which must be the reader's position."""
        if self._position != (step, 0):
            raise RuntimeError(f"reader: asked for step {step}, but its position is {self._position}")
        return [next(self) for _ in range(self.per_rank // self.micro)]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._position = (item.step + 1, 0) if item.last else (item.step, item.micro + 1)
        return item

    def close(self) -> None:
        """Stop the background work; iterating again restarts it at the current position."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._shards.clear()
        self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="reader-fetch")
        self._shards: OrderedDict[int, Future] = OrderedDict()
        self._thread = threading.Thread(target=self._produce, args=self._position, name="reader", daemon=True)
        self._thread.start()

    def _plan(self, step: int) -> None:
        """Keep (or start fetching) the shards of the steps from `step` on, in the order of
        their first use, as many as the budget allows (and always all of `step`'s own); drop
        the others. The look-ahead stops after an epoch's worth of steps."""
        wanted = dict.fromkeys(int(s) for s in self.shard_of(self.rank_blocks(step, 1)[0]))
        ahead, chunk = step + 1, 16
        horizon = step + 1 + math.ceil(self.blocks / self.batch_size)
        while len(wanted) < self.budget and ahead < horizon:
            for row in self.shard_of(self.rank_blocks(ahead, chunk)):
                new = [s for s in dict.fromkeys(int(x) for x in row) if s not in wanted]
                if len(wanted) + len(new) > self.budget:
                    ahead = horizon
                    break
                wanted.update(dict.fromkeys(new))
            ahead += chunk
        for index in [i for i in self._shards if i not in wanted]:
            self._shards.pop(index).cancel()
        for index in wanted:
            if index not in self._shards:
                self._shards[index] = self._pool.submit(read_shard, self.store, index, self.config_hash)

    def _produce(self, step: int, micro: int) -> None:
        try:
            micros = self.per_rank // self.micro
            while not self._stop.is_set():
                self._plan(step)
                blocks = self.rank_blocks(step, 1)[0]
                for m in range(micro, micros):
                    mine = blocks[m * self.micro : (m + 1) * self.micro]
                    parts = [(self._shards[int(s)].result(), int(b - self.first[s])) for b, s in zip(mine, self.shard_of(mine))]
                    batch = Batch(
                        step=step, micro=m, last=m == micros - 1, blocks=mine,
                        **collate(parts, self.bos, self.pad, self.width, self.candidates),
                    )
                    while not self._stop.is_set():
                        try:
                            self._queue.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if self._stop.is_set():
                        return
                step, micro = step + 1, 0
        except BaseException as e:  # handed to the consumer and raised there
            self._queue.put(e)
