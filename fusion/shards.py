"""The commit protocol: shards written whole, visible only through their commit record.

    <run>/<stage>/<part>/shard-00017.<digest>.zarr   arrays: a Zarr v3 group, content-addressed
    <run>/<stage>/<part>/shard-00017.json            commit record, created last (create-if-absent)
    <run>/<stage>/<part>/_COMMITTED.json             created once every shard has its record
    <run>/<stage>/<part>/_leases/                    elastic workers' claims (fusion/leases.py)

Readers trust records, never the presence of objects: a record names its arrays' folder and
lists every object with its size, and every array with its dtype, shape and checksum, so a
missing, truncated or corrupted object, or a changed dtype or shape, is an error that names
the object. A record carries the config hash of the stage that wrote it: a matching record
means "done, skip"; another hash is an error, because silently mixing outputs of two
configurations would corrupt the run.

Why the arrays' folder is named by a digest of its bytes: two workers may compute the same
shard at once (a lease taken over from a worker that was only slow). Each writes its own
complete folder, or the very same bytes to the same keys; the record, created at most once,
decides which folder counts. No writer ever deletes or half-overwrites what another reads.
Folders that no record names (left by killed or outraced writers) are removed when the part
is committed, and so are temporary files that killed writers left on local disks (once they are
STALE_TEMPORARY_SECONDS old, so that a concurrent writer's is never pulled from under it).

A shard's group is encoded in memory and uploaded object by object: each array is stored with
Zarr's sharding codec, so it is one object (up to SHARD_BYTES uncompressed) of inner chunks of
about CHUNK_BYTES, each compressed (zstd; Blosc byte-shuffle + zstd for multi-byte types) and
protected by a CRC32C.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from fusion.errors import FusionError
from fusion.store import Store, json_bytes

CHUNK_BYTES = 4 << 20  # uncompressed bytes of an inner chunk
SHARD_BYTES = 256 << 20  # uncompressed bytes of one stored object (a Zarr shard) at most
BLOSC_LEVEL = 5  # Blosc's scale: zstd level 9 inside
ZSTD_LEVEL = 9
COMMITTED = "_COMMITTED.json"
STALE_TEMPORARY_SECONDS = 3600  # a live temporary file exists for the moments of one write


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def part_dir(stage: str, part: str) -> str:
    return f"{stage}/{part}"


def record_path(stage: str, part: str, index: int) -> str:
    return f"{part_dir(stage, part)}/{shard_name(index)}.json"


def array_path(stage: str, part: str, record: dict) -> str:
    """The arrays' folder that a shard's record names."""
    return f"{part_dir(stage, part)}/{record['path']}"


def checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest()[:32]


# ---- records -------------------------------------------------------------------------------------
RECORD_KEYS = {"config_hash": str, "rows": int, "stored_bytes": int, "attrs": dict}
ARRAY_FOLDER = re.compile(r"^shard-\d{5}\.[0-9a-f]{16}\.zarr$")


def read_record(store: Store, stage: str, part: str, index: int, config_hash: str | None = None) -> dict | None:
    """The shard's commit record, or None if it is not committed.

    With config_hash given, a record written under another config is an error."""
    rel = record_path(stage, part, index)
    record = store.read_json(rel)
    if record is None:
        return None
    _check_record(store.uri(rel), record)
    if config_hash is not None and record["config_hash"] != config_hash:
        raise FusionError(
            f"{store.uri(rel)} was written with config hash {record['config_hash']}, this run's is "
            f"{config_hash}: the {stage} settings (or an earlier stage's) changed; use a new store, or "
            f"`fusion run SPEC --redo {stage}` to recompute it and what follows"
        )
    return record


def _check_record(where: str, record: object) -> None:
    if not isinstance(record, dict):
        raise FusionError(f"{where}: not a commit record (a JSON object expected)")
    for key, kind in RECORD_KEYS.items():
        if not isinstance(record.get(key), kind):
            raise FusionError(f"{where}: commit record lacks a valid '{key}' (truncated or not a record)")
    if "arrays" in record:
        if not (isinstance(record.get("path"), str) and ARRAY_FOLDER.match(record["path"])):
            raise FusionError(f"{where}: commit record has no valid 'path' to its arrays")
        if not isinstance(record.get("objects"), dict) or not isinstance(record["arrays"], dict):
            raise FusionError(f"{where}: commit record lacks its 'objects' or 'arrays' list")
    elif not isinstance(record.get("files"), dict):
        raise FusionError(f"{where}: commit record lists neither arrays nor files")


def _create_record(store: Store, stage: str, part: str, index: int, record: dict) -> dict:
    """Create the record once. If one exists already: the same config hash means another
    worker committed the shard first (its record wins and is returned); another hash is an
    error."""
    rel = record_path(stage, part, index)
    if store.create(rel, json_bytes(record)):
        return record
    existing = read_record(store, stage, part, index)
    if existing is None:
        raise FusionError(f"{store.uri(rel)}: exists but cannot be read back")
    if existing["config_hash"] != record["config_hash"]:
        raise FusionError(
            f"{store.uri(rel)} was written with config hash {existing['config_hash']}, this run's is "
            f"{record['config_hash']}: settings changed; use a new store, or `--redo {stage}`"
        )
    return existing


# ---- arrays --------------------------------------------------------------------------------------
def _layout(a: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape): whole rows, about CHUNK_BYTES and SHARD_BYTES."""
    rest = tuple(int(d) for d in a.shape[1:])
    row_bytes = max(1, a.itemsize * int(np.prod(rest, dtype=np.int64)))
    rows = max(1, int(a.shape[0]))
    inner = max(1, min(rows, CHUNK_BYTES // row_bytes))
    per_object = max(1, SHARD_BYTES // (inner * row_bytes))
    outer = inner * min(per_object, -(-rows // inner))
    return (inner, *rest), (outer, *rest)


def _compressors(dtype: np.dtype) -> list:
    if dtype.itemsize > 1:
        squeeze = BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle=BloscShuffle.shuffle, typesize=dtype.itemsize)
    else:
        squeeze = ZstdCodec(level=ZSTD_LEVEL)
    return [squeeze, Crc32cCodec()]


def encode_group(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Arrays as the objects of a Zarr v3 group (key -> bytes), built in memory."""
    mem: dict = {}
    group = zarr.open_group(MemoryStore(mem), mode="w", zarr_format=3)
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.ndim == 0:
            raise ValueError(f"array {name}: scalars are not stored; use a one-element array")
        chunks, shards = _layout(a)
        group.create_array(
            name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=chunks,
            shards=shards,
            compressors=_compressors(a.dtype),
            fill_value=0,
        )[...] = a
    return {key: buf.to_bytes() for key, buf in sorted(mem.items())}


def decode_arrays(where: str, objects: dict[str, bytes], names: list[str]) -> dict[str, np.ndarray]:
    """The named arrays of a group given as objects (key -> bytes)."""
    proto = default_buffer_prototype()
    mem = {key: proto.buffer.from_bytes(blob) for key, blob in objects.items()}
    try:
        group = zarr.open_group(MemoryStore(mem, read_only=True), mode="r", zarr_format=3)
    except Exception as e:  # zarr raises many kinds for unreadable metadata
        raise FusionError(f"{where}/zarr.json: not a readable Zarr group ({type(e).__name__}: {e})") from None
    out = {}
    for name in names:
        try:
            out[name] = group[name][...]
        except Exception as e:  # corrupt chunks surface as codec errors of many kinds
            raise FusionError(f"{where}/{name}: cannot be read ({type(e).__name__}: {e})") from None
    return out


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
    """Upload a shard's arrays, then create its commit record. `rows` is what `fusion status`
    counts (tokens or blocks). Returns the record that holds (ours, or an identical-config
    record that another worker created first)."""
    objects = encode_group(arrays)
    digest = hashlib.sha256()
    for key, blob in objects.items():
        digest.update(f"{key}\0{len(blob)}\0".encode() + blob)
    name = f"{shard_name(index)}.{digest.hexdigest()[:16]}.zarr"
    folder = f"{part_dir(stage, part)}/{name}"
    store.put_objects({f"{folder}/{key}": blob for key, blob in objects.items()})
    record = {
        "stage": stage,
        "part": part,
        "shard": index,
        "config_hash": config_hash,
        "rows": int(rows),
        "stored_bytes": sum(len(b) for b in objects.values()),
        "path": name,
        "objects": {key: len(blob) for key, blob in objects.items()},
        "arrays": {
            n: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": checksum(a)} for n, a in arrays.items()
        },
        "attrs": attrs or {},
    }
    return _create_record(store, stage, part, index, record)


def read_shard(
    store: Store, stage: str, part: str, index: int, names: list[str] | None = None, config_hash: str | None = None
) -> dict[str, np.ndarray]:
    """A committed shard's arrays, checked against its record: every object present with
    its recorded size, each array's dtype, shape and checksum."""
    record = read_record(store, stage, part, index, config_hash)
    if record is None:
        raise FusionError(f"{store.uri(record_path(stage, part, index))}: shard not committed (no record)")
    if "arrays" not in record:
        raise FusionError(f"{store.uri(record_path(stage, part, index))}: the shard holds files, not arrays")
    folder = array_path(stage, part, record)
    names = list(record["arrays"]) if names is None else names
    for name in names:
        if name not in record["arrays"]:
            raise FusionError(f"{store.uri(folder)}: no array '{name}' in its record")
    keys = [k for k in record["objects"] if k == "zarr.json" or k.split("/", 1)[0] in names]
    blobs = store.get_objects([f"{folder}/{k}" for k in keys])
    objects = {}
    for key in keys:
        blob = blobs[f"{folder}/{key}"]
        if blob is None:
            raise FusionError(f"{store.uri(folder)}/{key}: missing (listed in the shard's record)")
        if len(blob) != record["objects"][key]:
            raise FusionError(
                f"{store.uri(folder)}/{key}: {len(blob)} bytes but the record says {record['objects'][key]} "
                "(truncated or replaced)"
            )
        objects[key] = blob
    arrays = decode_arrays(store.uri(folder), objects, names)
    for name, a in arrays.items():
        want = record["arrays"][name]
        if list(a.shape) != want["shape"] or str(a.dtype) != want["dtype"]:
            raise FusionError(
                f"{store.uri(folder)}/{name}: {a.dtype}{list(a.shape)} "
                f"but the record says {want['dtype']}{want['shape']}"
            )
        if checksum(a) != want["sha256"]:
            raise FusionError(f"{store.uri(folder)}/{name}: checksum differs from its record (corrupt data)")
    return arrays


# ---- folders of files (models, reports) ---------------------------------------------------------
def files_path(stage: str, part: str, index: int) -> str:
    return f"{part_dir(stage, part)}/{shard_name(index)}.files"


def write_files_shard(
    store: Store, stage: str, part: str, index: int, local_dir: Path, config_hash: str, attrs: dict | None = None
) -> dict:
    """Commit a folder of files (a model, a report) the same way: upload whole, record last."""
    rel = files_path(stage, part, index)
    store.put_dir(local_dir, rel)
    paths = sorted(f for f in Path(local_dir).rglob("*") if f.is_file())
    files = {f.relative_to(local_dir).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:32] for f in paths}
    record = {
        "stage": stage,
        "part": part,
        "shard": index,
        "config_hash": config_hash,
        "rows": len(files),
        "stored_bytes": sum(f.stat().st_size for f in paths),
        "files": files,
        "attrs": attrs or {},
    }
    return _create_record(store, stage, part, index, record)


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


# ---- parts ---------------------------------------------------------------------------------------
def committed_indices(store: Store, stage: str, part: str) -> set[int]:
    """Shards that have a record (one listing; records are checked when read)."""
    out = set()
    for name in store.list(part_dir(stage, part)):
        m = re.match(r"^shard-(\d{5})\.json$", name)
        if m:
            out.add(int(m.group(1)))
    return out


def commit_part(store: Store, stage: str, part: str, n_shards: int, config_hash: str) -> None:
    """Create _COMMITTED.json once every shard of the part has its record (any worker may
    call this; the first creates it), and remove array folders no record names and stale
    temporary files."""
    rel = f"{part_dir(stage, part)}/{COMMITTED}"
    if is_part_committed(store, stage, part, config_hash):
        return
    totals = {"shards": n_shards, "rows": 0, "bytes": 0}
    named = set()
    for i in range(n_shards):
        record = read_record(store, stage, part, i, config_hash)
        if record is None:
            raise FusionError(f"{store.uri(part_dir(stage, part))}: {shard_name(i)} is not committed")
        totals["rows"] += int(record["rows"])
        totals["bytes"] += int(record["stored_bytes"])
        named.add(record.get("path"))
    for name in store.list(part_dir(stage, part)):
        if ARRAY_FOLDER.match(name) and name not in named:
            store.remove(f"{part_dir(stage, part)}/{name}")
    store.sweep_temporaries(part_dir(stage, part), STALE_TEMPORARY_SECONDS)
    store.create(rel, json_bytes({"stage": stage, "part": part, "config_hash": config_hash, **totals}))
    is_part_committed(store, stage, part, config_hash)  # another config's marker won the race: an error


def is_part_committed(store: Store, stage: str, part: str, config_hash: str) -> bool:
    record = store.read_json(f"{part_dir(stage, part)}/{COMMITTED}")
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
    done = store.read_json(f"{part_dir(stage, part)}/{COMMITTED}")
    if done is not None:  # the totals were summed when the part was committed
        return PartStatus(stage, part, int(done["shards"]), int(done["rows"]), int(done["bytes"]), True)
    indices = sorted(committed_indices(store, stage, part))
    blobs = store.get_objects([record_path(stage, part, i) for i in indices])
    rows = size = 0
    for blob in blobs.values():
        record = _loads(blob)
        rows += int(record.get("rows", 0))
        size += int(record.get("stored_bytes", 0))
    return PartStatus(stage, part, len(indices), rows, size, False)


def _loads(blob: bytes | None) -> dict:
    try:
        return json.loads(blob) if blob else {}
    except ValueError:
        return {}
