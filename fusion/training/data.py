"""The packed training blocks (the fuse stage's output) as the trainer reads them.

`open_reader` is the trainer's only way to the data. It returns an iterator of `Block`s for
one rank with `state_dict()` / `load_state_dict()` (the data position a checkpoint holds).

Order: per epoch, a permutation of all blocks seeded by (train.seed, epoch). Rank r of W reads
global positions r, r + W, r + 2W, ...; so the B blocks of optimizer step s are global
positions s*B .. s*B + B - 1 whatever the world size, and one process, two processes and two
nodes train on the same global batches.

This reader holds all packed shards in memory (fine up to a few GB of packed data); the
streaming reader (fusion/reader.py) replaces it for corpus-scale runs behind the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion import shards
from fusion.errors import FusionError
from fusion.run import Run
from fusion.sparse import SparseRows
from fusion.stages import fuse


@dataclass
class Block:
    tokens: np.ndarray  # int64 [n]: target token ids
    rows: SparseRows  # the fused teacher distribution of each token (fusion/sparse.py)
    choice: int  # the candidate MinCE chose for the block: 0 = the target, i = source i
    where: str  # "fuse/train/shard-00003 block 17", for messages


def check_packed(run: Run) -> None:
    """Refuse packed data that was not made for this run's target, before any training."""
    if not shards.is_part_committed(run.store, fuse.NAME, fuse.PART, run.hash(fuse.NAME, fuse.PART)):
        where = run.store.uri(shards.part_dir(fuse.NAME, fuse.PART))
        raise FusionError(f"train: {where} is not committed (run the fuse stage first)")
    tokenizer_hash = run.tokenizer_hash(run.target.name)
    for i in range(fuse.shard_count(run, fuse.PART)):
        record = shards.read_record(run.store, fuse.NAME, fuse.PART, i)
        packed_for = record["attrs"].get("target_tokenizer")
        if packed_for is not None and packed_for != tokenizer_hash:
            raise FusionError(
                f"train: {run.store.uri(shards.record_path(fuse.NAME, fuse.PART, i))} was packed for a target "
                f"tokenizer with hash {packed_for}, this run's target '{run.target.name}' has {tokenizer_hash}: "
                f"made for another target; re-run fuse for this one"
            )


@dataclass
class Packed:
    """All packed blocks of a run, flat: block b owns tokens[ptr[b]:ptr[b+1]] and their rows."""

    tokens: np.ndarray
    ptr: np.ndarray
    rows: SparseRows
    row_ptr: np.ndarray  # entries of row r: rows.ids[row_ptr[r]:row_ptr[r+1]]
    choice: np.ndarray
    shard_of: np.ndarray  # shard index of each block
    first_of_shard: np.ndarray  # global index of each shard's first block

    @property
    def blocks(self) -> int:
        return len(self.ptr) - 1

    def block(self, b: int) -> Block:
        a, z = int(self.ptr[b]), int(self.ptr[b + 1])
        ea, ez = int(self.row_ptr[a]), int(self.row_ptr[z])
        r = self.rows
        rows = SparseRows(r.counts[a:z], r.ids[ea:ez], r.logprobs[ea:ez], r.tail[a:z])
        shard = int(self.shard_of[b])
        where = f"{shards.part_dir(fuse.NAME, fuse.PART)}/{shards.shard_name(shard)} block {b - int(self.first_of_shard[shard])}"
        return Block(self.tokens[a:z], rows, int(self.choice[b]), where)


def load_packed(run: Run) -> Packed:
    arrays = [fuse.read(run, i) for i in range(fuse.shard_count(run, fuse.PART))]
    per_shard = [len(a["seq_ptr"]) - 1 for a in arrays]
    lengths = np.concatenate([np.diff(a["seq_ptr"]) for a in arrays]) if arrays else np.zeros(0, np.int64)
    ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    rows = SparseRows(
        counts=np.concatenate([a["counts"] for a in arrays]).astype(np.int32),
        ids=np.concatenate([a["ids"] for a in arrays]).astype(np.int64),
        logprobs=np.concatenate([a["logprobs"] for a in arrays]).astype(np.float32),
        tail=np.concatenate([a["tail"] for a in arrays]).astype(np.float32),
    )
    return Packed(
        tokens=np.concatenate([a["tokens"] for a in arrays]).astype(np.int64),
        ptr=ptr,
        rows=rows,
        row_ptr=rows.ptr,
        choice=np.concatenate([a["choice"] for a in arrays]).astype(np.int64),
        shard_of=np.repeat(np.arange(len(arrays)), per_shard),
        first_of_shard=np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64),
    )


class BlockReader:
    """Blocks of one rank in the order described in the module doc; endless (epoch after epoch)."""

    def __init__(self, packed: Packed, seed: int, rank: int, world_size: int):
        self.packed, self.seed, self.rank, self.world_size = packed, seed, rank, world_size
        self.position = 0  # blocks this rank has read
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def blocks(self) -> int:
        return self.packed.blocks

    def __iter__(self):
        return self

    def __next__(self) -> Block:
        epoch, pos = divmod(self.position * self.world_size + self.rank, self.packed.blocks)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.packed.blocks))
        self.position += 1
        return self.packed.block(int(self._order[1][pos]))

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size"):
            if state[key] != mine[key]:
                raise FusionError(
                    f"train: the checkpoint's data position is for {key}={state[key]}, this process has {mine[key]}"
                )
        self.position = int(state["position"])


def open_reader(run: Run, rank: int, world_size: int) -> BlockReader:
    """The data of one rank. The one function to change when the streaming reader lands."""
    packed = load_packed(run)
    if packed.blocks == 0:
        raise FusionError("train: the packed data holds no blocks")
    return BlockReader(packed, run.spec.train.seed, rank, world_size)


# ---- blocks as tensors ---------------------------------------------------------------------------
@dataclass
class Batch:
    inputs: object  # [B, W+1] token ids, BOS first (padding: pad id)
    mask: object  # [B, W+1] attention mask
    labels: object  # [B, W] (-100: no loss)
    teacher_ids: object  # [B, W, K] (-1: padding)
    teacher_logprobs: object  # [B, W, K] (-inf: padding)
    teacher_tail: object  # [B, W]
    tokens: int  # positions with a loss
    choice: list[int]  # blocks per MinCE winner (index 0: the target)
    skipped: list[str]  # blocks dropped for non-finite teacher data


def bad_teacher_data(block: Block) -> bool:
    lp, tail = block.rows.logprobs, block.rows.tail
    return bool(np.isnan(lp).any() or np.isposinf(lp).any() or not np.isfinite(tail).all() or (tail < 0).any())


def collate(blocks: list[Block], bos: int, pad: int, width: int, candidates: int) -> Batch:
    """Tensors for a list of blocks. Ids outside the target's `width` logits are an error
    (packed for another tokenizer); a block with non-finite teacher data is skipped: it keeps
    its place in the batch (the same shapes and collectives on every rank) but carries no loss."""
    import torch

    for block in blocks:
        for name, ids in (("token", block.tokens), ("teacher", block.rows.ids)):
            if len(ids) and (int(ids.max()) >= width or int(ids.min()) < 0):
                culprit = int(ids.max()) if int(ids.max()) >= width else int(ids.min())
                raise FusionError(
                    f"train: {block.where} holds {name} id {culprit} but the target has {width} logits "
                    f"(packed for another tokenizer or vocabulary?)"
                )
        if not 0 <= block.choice < candidates:
            raise FusionError(
                f"train: {block.where} names candidate {block.choice}, but this run has {candidates} (target + sources)"
            )
    bad = [bad_teacher_data(b) for b in blocks]
    lengths = [len(b.tokens) for b in blocks]
    n_rows, longest = len(blocks), max(lengths)
    k = max(1, max(int(b.rows.counts.max(initial=0)) for b in blocks))
    inputs = np.full((n_rows, longest + 1), pad, dtype=np.int64)
    mask = np.zeros((n_rows, longest + 1), dtype=np.int64)
    labels = np.full((n_rows, longest), -100, dtype=np.int64)
    t_ids = np.full((n_rows, longest, k), -1, dtype=np.int64)
    t_lp = np.full((n_rows, longest, k), -np.inf, dtype=np.float32)
    t_tail = np.zeros((n_rows, longest), dtype=np.float32)
    inputs[:, 0] = bos
    for r, (b, n) in enumerate(zip(blocks, lengths)):
        inputs[r, 1 : n + 1] = b.tokens
        mask[r, : n + 1] = 1
        if bad[r]:
            continue
        labels[r, :n] = b.tokens
        t_ids[r, :n], t_lp[r, :n] = b.rows.padded(k)
        t_tail[r, :n] = b.rows.tail
    as_t = torch.from_numpy
    return Batch(
        as_t(inputs),
        as_t(mask),
        as_t(labels),
        as_t(t_ids),
        as_t(t_lp),
        as_t(t_tail),
        tokens=int((labels != -100).sum()),
        choice=np.bincount([b.choice for b in blocks], minlength=candidates).tolist(),
        skipped=[b.where for b, is_bad in zip(blocks, bad) if is_bad],
    )
