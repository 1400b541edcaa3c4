"""The commit protocol: shards written whole, visible only through their commit record.

    <run>/<stage>/<part>/shard-00017.zarr    arrays, written by exactly one writer
    <run>/<stage>/<part>/shard-00017.json    commit record, written last and atomically
    <run>/<stage>/<part>/_COMMITTED.json     written once every shard has its record

Readers trust records, never the presence of chunks. A record carries the config hash of the
stage that wrote it: a matching record means "done, skip"; another hash is an error, because
silently mixing outputs of two configurations would corrupt the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numcodecs import Zstd  # noqa: F401  (registers zstd with numcodecs for zarr v2 readers)
from zarr.codecs import ZstdCodec

from fusion.errors import FusionError
from fusion.store import Store

CHUNK_BYTES = 4 << 20  # inner chunks of about 4 MB: large enough for object storage


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def part_dir(stage: str, part: str) -> str:
    return f"{stage}/{part}"


def record_path(stage: str, part: str, index: int) -> str:
    return f"{part_dir(stage, part)}/{shard_name(index)}.json"


def array_path(stage: str, part: str, index: int) -> str:
    return f"{part_dir(stage, part)}/{shard_name(index)}.zarr"


def checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest()[:32]


def read_record(store: Store, stage: str, part: str, index: int, config_hash: str | None = None) -> dict | None:
    """The shard's commit record, or None if it is not committed.

    With config_hash given, a record written under another config is an error."""
    rel = record_path(stage, part, index)
    record = store.read_json(rel)
    if record is None:
        return None
    if config_hash is not None and record.get("config_hash") != config_hash:
        raise FusionError(
            f"{store.uri(rel)} was written with config hash {record.get('config_hash')}, this run's is "
            f"{config_hash}: the {stage} settings (or an earlier stage's) changed; use a new store, or "
            f"`fusion run SPEC --redo {stage}` to recompute it and what follows"
        )
    return record


def chunk_rows(a: np.ndarray) -> int:
    row_bytes = max(1, a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    return max(1, min(max(1, a.shape[0]), CHUNK_BYTES // row_bytes))


def write_shard(
    store: Store,
    stage: str,
    part: str,
    index: int,
    arrays: dict[str, np.ndarray],
    config_hash: str,
    rows: int,
    attrs: dict | None = None,
) -> dict:
    """Write a shard's arrays, then its commit record. Anything left by a killed writer is
    replaced. `rows` is what `fusion status` counts (tokens or blocks). Returns the record."""
    rel = array_path(stage, part, index)
    store.remove(rel)
    group = store.open_group(rel, mode="w")
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        group.create_array(
            name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=(chunk_rows(a), *a.shape[1:]) if a.ndim else (),
            compressors=ZstdCodec(level=3),
            fill_value=0,
        )[...] = a
    arrays_meta = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": checksum(a)} for name, a in arrays.items()}
    return _commit(store, stage, part, index, config_hash, rows, {"arrays": arrays_meta}, rel, attrs)


def write_files_shard(
    store: Store, stage: str, part: str, index: int, local_dir: Path, config_hash: str, attrs: dict | None = None
) -> dict:
    """Commit a folder of files (a model, a report) the same way: upload whole, record last."""
    rel = files_path(stage, part, index)
    store.put_dir(local_dir, rel)
    files = {
        f.relative_to(local_dir).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:32]
        for f in sorted(Path(local_dir).rglob("*"))
        if f.is_file()
    }
    return _commit(store, stage, part, index, config_hash, len(files), {"files": files}, rel, attrs)


def _commit(store, stage, part, index, config_hash, rows, content, rel, attrs) -> dict:
    record = {
        "stage": stage,
        "part": part,
        "shard": index,
        "config_hash": config_hash,
        "rows": int(rows),
        "stored_bytes": int(store.fs.du(store.path(rel))),
        **content,
        "attrs": attrs or {},
    }
    store.write_json(record_path(stage, part, index), record)
    return record


def files_path(stage: str, part: str, index: int) -> str:
    return f"{part_dir(stage, part)}/{shard_name(index)}.files"


def read_files_shard(store: Store, stage: str, part: str, index: int, local_dir: Path) -> Path:
    """A committed folder of files, checked against its record; returns where it lies locally."""
    record = read_record(store, stage, part, index)
    rel = files_path(stage, part, index)
    if record is None:
        raise FusionError(f"{store.uri(rel)} is not committed (no {shard_name(index)}.json record)")
    folder = store.get_dir(rel, local_dir)
    for name, digest in record["files"].items():
        f = folder / name
        if not f.is_file():
            raise FusionError(f"{store.uri(rel)}/{name}: listed in its record but missing")
        if hashlib.sha256(f.read_bytes()).hexdigest()[:32] != digest:
            raise FusionError(f"{store.uri(rel)}/{name}: checksum differs from its record (corrupt data)")
    return folder


def read_shard(store: Store, stage: str, part: str, index: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """A committed shard's arrays, checked against the record (shape, dtype, checksum)."""
    record = read_record(store, stage, part, index)
    rel = array_path(stage, part, index)
    if record is None:
        raise FusionError(f"{store.uri(rel)} is not committed (no {shard_name(index)}.json record)")
    try:
        group = store.open_group(rel, mode="r")
    except FileNotFoundError:
        raise FusionError(f"{store.uri(rel)}: committed but its arrays are missing") from None
    out = {}
    for name in names or list(record["arrays"]):
        want = record["arrays"].get(name)
        if want is None:
            raise FusionError(f"{store.uri(rel)}: no array '{name}' in its record")
        try:
            a = group[name][...]
        except Exception as e:  # zarr raises many kinds for missing or corrupt chunks
            raise FusionError(f"{store.uri(rel)}/{name}: cannot be read ({type(e).__name__}: {e})") from None
        if list(a.shape) != want["shape"] or str(a.dtype) != want["dtype"]:
            raise FusionError(
                f"{store.uri(rel)}/{name}: {a.dtype}{list(a.shape)} but the record says "
                f"{want['dtype']}{want['shape']}"
            )
        if checksum(a) != want["sha256"]:
            raise FusionError(f"{store.uri(rel)}/{name}: checksum differs from its record (corrupt data)")
        out[name] = a
    return out


def commit_part(store: Store, stage: str, part: str, n_shards: int, config_hash: str) -> None:
    """Write _COMMITTED.json once every shard of the part has its record."""
    rel = f"{part_dir(stage, part)}/_COMMITTED.json"
    existing = store.read_json(rel)
    if existing is not None:
        if existing.get("config_hash") != config_hash:
            raise FusionError(f"{store.uri(rel)}: committed under config hash {existing.get('config_hash')}, not {config_hash}")
        return
    totals = {"shards": n_shards, "rows": 0, "bytes": 0}
    for i in range(n_shards):
        record = read_record(store, stage, part, i, config_hash)
        if record is None:
            raise FusionError(f"{store.uri(part_dir(stage, part))}: {shard_name(i)} is not committed")
        totals["rows"] += int(record["rows"])
        totals["bytes"] += int(record["stored_bytes"])
    store.write_json(rel, {"stage": stage, "part": part, "config_hash": config_hash, **totals}, exclusive=True)


def is_part_committed(store: Store, stage: str, part: str, config_hash: str) -> bool:
    record = store.read_json(f"{part_dir(stage, part)}/_COMMITTED.json")
    if record is None:
        return False
    if record.get("config_hash") != config_hash:
        raise FusionError(
            f"{store.uri(part_dir(stage, part))} was committed with config hash {record.get('config_hash')}, "
            f"this run's is {config_hash}: settings changed; use a new store, or `--redo {stage}`"
        )
    return True


@dataclass
class PartStatus:
    stage: str
    part: str
    committed: int
    rows: int
    stored_bytes: int
    complete: bool


def part_status(store: Store, stage: str, part: str) -> PartStatus:
    """Committed shards, rows (tokens) and stored bytes of one part, read from its records."""
    rows = size = committed = 0
    for name in store.list(part_dir(stage, part)):
        if name.startswith("shard-") and name.endswith(".json"):
            record = store.read_json(f"{part_dir(stage, part)}/{name}") or {}
            committed += 1
            rows += int(record.get("rows", 0))
            size += int(record.get("stored_bytes", 0))
    done = store.exists(f"{part_dir(stage, part)}/_COMMITTED.json")
    return PartStatus(stage, part, committed, rows, size, done)
