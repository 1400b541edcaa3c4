"""Streaming the packed training set (the fuse stage's shards) from the store to a trainer.

    reader = PackedReader.for_run(run, rank=rank, world_size=world_size)
    reader.load_state_dict(checkpoint["reader"])     # to resume (optional)
    for batch in reader:                             # endless: stop at your last step
        if batch.step >= total_steps: break
        loss = ... batch.inputs, batch.mask, batch.labels, batch.teacher_ids, ...
        share = batch.tokens / batch.step_tokens     # token-weighted mean over the global batch
        if batch.last: optimizer.step(); checkpoint["reader"] = reader.state_dict()

It replaces `train.load_packed` + `batch_blocks` + `collate`: the tensors have collate's layout
(inputs [B, W+1] with BOS first and `pad` after the block, mask [B, W+1], labels [B, W] with
-100 on padding, teacher_ids [B, W, K] int64 padded with -1, teacher_logprobs [B, W, K]
float32 padded with -inf, teacher_tail [B, W] float32), and the order is the same.

Order. Optimizer step s uses the global blocks at positions s*batch_size .. (s+1)*batch_size - 1
of an endless sequence of epochs; each epoch is a permutation drawn from the seed. With
`window_shards` unset (small runs) the permutation is over all blocks, exactly
`train.sample_order`. With `window_shards=W` (runs larger than memory) the epoch's shards
are permuted, cut into windows of W shards, and the blocks of each window permuted: each
rank then holds about 2*W shards in memory (the window it reads and the next, prefetched).

Data parallel ranks. Rank r of world_size takes the global batch's blocks r, r + world_size,
... and splits them into micro-batches of `micro_batch_size`. The global batch does not depend
on world_size, so a run may resume with another number of ranks; `batch.step_tokens` is the
global batch's real token count, for a token-weighted loss across ranks.

Position. `state_dict()` is the position after the last batch handed out (step, micro-batch
within it) plus what fixes the order (seed, batch size, window, block count), checked on
`load_state_dict`, which restarts the prefetching there.

Prefetch. A background thread makes the next `prefetch` micro-batches (fetching, decoding,
collating) while the trainer computes, and a small pool downloads the shards of upcoming steps
ahead of need, so the trainer waits only if the store is slower than training.
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
from fusion.store import Store

STAGE, PART = "fuse", "train"


@dataclass
class Batch:
    step: int  # the optimizer step this micro-batch belongs to
    micro: int  # its index among this rank's micro-batches of the step
    last: bool  # the last micro-batch of the step on this rank
    blocks: np.ndarray  # global block indices
    tokens: int  # real tokens in this micro-batch
    step_tokens: int  # real tokens in the whole global batch (all ranks)
    choice: np.ndarray  # per block: the fused candidate that won (0 = target)
    inputs: object  # torch tensors from here on
    mask: object
    labels: object
    teacher_ids: object
    teacher_logprobs: object
    teacher_tail: object


@dataclass
class Shard:
    """One decoded fuse shard: block b owns tokens[ptr[b]:ptr[b+1]] and those rows."""

    tokens: np.ndarray
    ptr: np.ndarray
    counts: np.ndarray
    row_ptr: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    choice: np.ndarray


def read_packed_shard(store: Store, index: int, config_hash: str | None) -> Shard:
    stored = shards.read_shard(store, STAGE, PART, index, config_hash=config_hash)
    counts, ids, logprobs = encoding.decode_rows(stored, stored["tokens"])
    return Shard(
        tokens=stored["tokens"],
        ptr=encoding.row_ptr(stored["seq_len"].astype(np.int64)),
        counts=counts,
        row_ptr=encoding.row_ptr(counts),
        ids=ids,
        logprobs=logprobs,
        tail=stored["tail"],
        choice=stored["choice"],
    )


def epoch_order(lengths_per_shard: list[int], seed: int, epoch: int, window: int | None) -> np.ndarray:
    """The global block indices of one epoch, in training order."""
    total = sum(lengths_per_shard)
    if window is None or window >= len(lengths_per_shard):
        return np.random.default_rng([seed, epoch]).permutation(total)
    first = np.zeros(len(lengths_per_shard) + 1, dtype=np.int64)
    np.cumsum(lengths_per_shard, out=first[1:])
    shard_order = np.random.default_rng([seed, epoch, 1]).permutation(len(lengths_per_shard))
    out = []
    for w, start in enumerate(range(0, len(shard_order), window)):
        members = np.concatenate([np.arange(first[s], first[s + 1]) for s in shard_order[start : start + window]])
        out.append(members[np.random.default_rng([seed, epoch, 2, w]).permutation(len(members))])
    return np.concatenate(out)


class PackedReader:
    def __init__(
        self,
        store: Store,
        *,
        batch_size: int,
        seed: int,
        bos: int,
        pad: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        window_shards: int | None = None,
        prefetch: int = 4,
        config_hash: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise FusionError(f"reader: rank {rank} is not within world size {world_size}")
        if batch_size < world_size:
            raise FusionError(f"reader: batch size {batch_size} is smaller than world size {world_size}")
        self.store, self.config_hash = store, config_hash
        self.batch_size, self.seed, self.bos, self.pad = batch_size, seed, bos, pad
        self.micro = micro_batch_size or batch_size
        self.rank, self.world_size = rank, world_size
        self.window, self.prefetch = window_shards, max(1, prefetch)
        record = store.read_json(f"{shards.part_dir(STAGE, PART)}/{shards.COMMITTED}")
        if record is None:
            raise FusionError(f"{store.uri(shards.part_dir(STAGE, PART))}: the packed set is not committed")
        if config_hash is not None and record["config_hash"] != config_hash:
            raise FusionError(
                f"{store.uri(shards.part_dir(STAGE, PART))} was committed with config hash {record['config_hash']}, "
                f"expected {config_hash}"
            )
        self.n_shards = int(record["shards"])
        self.lengths = self._block_lengths()  # per shard: tokens of each block
        self.shard_of = np.concatenate([np.full(len(x), s, dtype=np.int64) for s, x in enumerate(self.lengths)])
        self.local = np.concatenate([np.arange(len(x)) for x in self.lengths])
        self.block_tokens = np.concatenate(self.lengths).astype(np.int64) if self.lengths else np.zeros(0, np.int64)
        self.blocks = len(self.block_tokens)
        if self.blocks == 0:
            raise FusionError(f"{store.uri(shards.part_dir(STAGE, PART))}: the packed set holds no blocks")
        cache = 2 * window_shards + 2 if window_shards else self.n_shards
        self._cache_size = max(2, cache)
        self._orders: dict[int, np.ndarray] = {}
        self._position = (0, 0)  # next (step, micro) to hand out
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(cls, run, rank: int = 0, world_size: int = 1, **kwargs) -> PackedReader:
        """A reader with the run's training settings (batch sizes, seed, the target's BOS/pad)."""
        from fusion import models

        spec, target = run.spec.train, run.target
        tokenizer = run.tokenizers[target.name]
        bos = models.context_token_id(target, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
        kwargs = {"micro_batch_size": spec.micro_batch_size, **kwargs}
        return cls(
            run.store, batch_size=spec.batch_size, seed=spec.seed, bos=bos, pad=pad, rank=rank,
            world_size=world_size, config_hash=run.hash(STAGE, PART), **kwargs,
        )

    def steps(self, epochs: float) -> int:
        """Optimizer steps in `epochs` passes over the data (train.total_steps)."""
        return max(1, math.ceil(epochs * self.blocks / self.batch_size))

    def _block_lengths(self) -> list[np.ndarray]:
        def lengths(i: int) -> np.ndarray:
            arrays = shards.read_shard(self.store, STAGE, PART, i, ["seq_len"], self.config_hash)
            return arrays["seq_len"].astype(np.int64)

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lengths, range(self.n_shards)))

    # ---- order ------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order([len(x) for x in self.lengths], self.seed, epoch, self.window)
        return self._orders[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """The global block indices of an optimizer step (all ranks)."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(positions, self.blocks)
        return np.array([self._order(int(e))[int(p)] for e, p in zip(epochs, within)], dtype=np.int64)

    def rank_micro_batches(self, step: int) -> tuple[list[np.ndarray], int]:
        batch = self.global_batch(step)
        mine = batch[self.rank :: self.world_size]
        return [mine[i : i + self.micro] for i in range(0, len(mine), self.micro)], int(self.block_tokens[batch].sum())

    # ---- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        step, micro = self._position
        return {
            "step": step,
            "micro": micro,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro,
            "window_shards": self.window,
            "blocks": self.blocks,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "window_shards", "blocks"):
            if state.get(key) != mine[key]:
                raise FusionError(f"reader state: {key} is {state.get(key)!r} but this reader's is {mine[key]!r}")
        micro = int(state.get("micro", 0))
        if micro and state.get("micro_batch_size") != self.micro:
            raise FusionError("reader state: saved within a step with another micro_batch_size")
        self.close()
        self._position = (int(state["step"]), micro)

    def seek(self, step: int) -> None:
        """Continue at the first micro-batch of `step`."""
        self.close()
        self._position = (int(step), 0)

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._position = (item.step, item.micro + 1) if not item.last else (item.step + 1, 0)
        return item

    def close(self) -> None:
        """Stop the background work (iteration restarts it from the current position)."""
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
        self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="reader-fetch")
        self._shards: OrderedDict[int, Future] = OrderedDict()
        self._thread = threading.Thread(target=self._produce, args=self._position, name="reader", daemon=True)
        self._thread.start()

    def _fetch(self, index: int) -> Future:
        if index in self._shards:
            self._shards.move_to_end(index)
        else:
            self._shards[index] = self._pool.submit(read_packed_shard, self.store, index, self.config_hash)
            while len(self._shards) > self._cache_size:
                self._shards.popitem(last=False)
        return self._shards[index]

    def _produce(self, step: int, micro: int) -> None:
        try:
            lookahead = max(1, self.prefetch // max(1, math.ceil(self.batch_size / self.world_size / self.micro)))
            while not self._stop.is_set():
                for ahead in range(step + 1, step + 1 + lookahead):  # downloads ahead of need
                    for s in np.unique(self.shard_of[self.global_batch(ahead)[self.rank :: self.world_size]]):
                        self._fetch(int(s))
                micros, step_tokens = self.rank_micro_batches(step)
                for m in range(micro, len(micros)):
                    batch = self._collate(step, m, len(micros), micros[m], step_tokens)
                    while not self._stop.is_set():
                        try:
                            self._queue.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if self._stop.is_set():
                        return
                step, micro = step + 1, 0
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def _collate(self, step: int, micro: int, micros: int, blocks: np.ndarray, step_tokens: int) -> Batch:
        import torch

        parts = [(self._fetch(int(self.shard_of[b])).result(), int(self.local[b])) for b in blocks]
        lengths = [int(s.ptr[j + 1] - s.ptr[j]) for s, j in parts]
        width = max(lengths)
        k = max(1, max(int(s.counts[s.ptr[j] : s.ptr[j + 1]].max(initial=0)) for s, j in parts))
        n = len(blocks)
        inputs = np.full((n, width + 1), self.pad, dtype=np.int64)
        mask = np.zeros((n, width + 1), dtype=np.int64)
        labels = np.full((n, width), -100, dtype=np.int64)
        t_ids = np.full((n, width, k), -1, dtype=np.int64)
        t_lp = np.full((n, width, k), -np.inf, dtype=np.float32)
        t_tail = np.zeros((n, width), dtype=np.float32)
        inputs[:, 0] = self.bos
        for r, ((s, j), length) in enumerate(zip(parts, lengths)):
            a = int(s.ptr[j])
            inputs[r, 1 : length + 1] = s.tokens[a : a + length]
            labels[r, :length] = s.tokens[a : a + length]
            mask[r, : length + 1] = 1
            counts = s.counts[a : a + length]
            lo, hi = int(s.row_ptr[a]), int(s.row_ptr[a + length])
            row = np.repeat(np.arange(length), counts)
            col = np.arange(hi - lo) - (s.row_ptr[a : a + length] - lo).repeat(counts)
            t_ids[r, row, col] = s.ids[lo:hi]
            t_lp[r, row, col] = s.logprobs[lo:hi]
            t_tail[r, :length] = s.tail[a : a + length]
        as_t = torch.from_numpy
        return Batch(
            step=step,
            micro=micro,
            last=micro == micros - 1,
            blocks=blocks,
            tokens=int(sum(lengths)),
            step_tokens=step_tokens,
            choice=np.array([s.choice[j] for s, j in parts], dtype=np.uint8),
            inputs=as_t(inputs),
            mask=as_t(mask),
            labels=as_t(labels),
            teacher_ids=as_t(t_ids),
            teacher_logprobs=as_t(t_lp),
            teacher_tail=as_t(t_tail),
        )
