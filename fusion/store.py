"""A run's store: one URL (a path, file://, memory://, s3://) seen through fsspec.

Everything a run produces lives under that URL; stages talk to it only through this module
and fusion.shards (the commit protocol). Paths given to a Store are relative to its root.

Every write puts a whole object: readers see the old object or the new one, never a part.
`create` writes only where no object exists yet (create-if-absent), which the commit protocol
and the leases build on: a hard link on local disks, a conditional PUT (`If-None-Match: *`)
on S3.

S3 stores are reached through s3fs. Endpoint, region and credentials come from the run spec's
`store_options` (which names environment variables, never holds secrets) or the usual AWS
environment. Requests that fail (5xx, throttling, dropped connections, timeouts) are retried
with exponential back-off and jitter by botocore and s3fs, up to `max_attempts`.

Every operation goes through `_do`, which turns storage failures into one of two answers
(fusion/store_failures.py): a store that cannot be used as given (read-only, full, a path
through a file, no such bucket, credentials refused) is a FusionError naming the store (exit
3); a store that does not answer (refused connections, timeouts, 5xx past the retries) is
waited for, with capped back-off and a log line a minute, for `store_options.outage_seconds`,
then StoreUnreachable (its own, retryable exit code). Every operation is safe to repeat: whole
objects are put, and a create repeated after its first attempt took effect finds its own bytes.
On S3 the bucket is checked once, at the first operation.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import fsspec

from fusion.config import StoreOptionsSpec
from fusion.errors import FusionError
from fusion.store_failures import Outage, OutageLog, classify, s3_error

# How often a create-if-absent that met a concurrent write to its key (409) is tried again.
CONFLICT_RETRIES = 10

def normalize_url(url: str) -> str:
    """Plain paths become absolute file:// URLs; URLs pass through."""
    if "://" in url:
        return url.rstrip("/")
    return "file://" + str(Path(url).expanduser().resolve())


def _env(name: str, key: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise FusionError(f"store_options.{key}: environment variable {name} is not set")
    return value


def s3_options(options: StoreOptionsSpec) -> dict:
    """s3fs keyword arguments for the spec's store_options (secrets read from the environment)."""
    kwargs: dict = {
        "use_listings_cache": False,  # listings must be fresh: workers poll them for new records
        "config_kwargs": {
            "retries": {"max_attempts": options.max_attempts, "mode": "standard"},  # 5xx, throttling
            "connect_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
        },
    }
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        kwargs["client_kwargs"] = {"region_name": options.region}
    if options.profile:
        kwargs["profile"] = options.profile
    if options.access_key_id_env:
        kwargs["key"] = _env(options.access_key_id_env, "access_key_id_env")
        kwargs["secret"] = _env(options.secret_access_key_env, "secret_access_key_env")
    if options.session_token_env:
        kwargs["token"] = _env(options.session_token_env, "session_token_env")
    return kwargs


class Store:
    def __init__(self, url: str, options: StoreOptionsSpec | None = None):
        self.url = normalize_url(url)
        self.protocol = self.url.split("://", 1)[0]
        kwargs: dict = {}
        options = options or StoreOptionsSpec()
        self.outage_seconds = options.outage_seconds
        self._outage_log = OutageLog()
        self._bucket_checked = threading.Event()
        if self.protocol == "file":
            kwargs["auto_mkdir"] = True
        elif self.protocol in ("s3", "s3a"):
            kwargs = s3_options(options)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **kwargs)
        except (ImportError, ValueError, TypeError) as e:
            raise FusionError(f"store {self.url}: cannot open ({type(e).__name__}: {e})") from None
        if self.protocol in ("s3", "s3a"):
            self.fs.retries = options.max_attempts  # s3fs's own retries: timeouts, dropped connections
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:  # the URL only: the filesystem object may hold credentials
        return f"Store({self.url})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str) -> Path | None:
        """The path on this machine for file:// stores, else None."""
        return Path(self.path(rel)) if self.protocol == "file" else None

    # ---- failures ----------------------------------------------------------------------
    def _do(self, what: str, operation):
        """Run one store operation (a function of no arguments), answering storage failures as
        the module says: a FusionError naming the store, or waiting out an outage."""
        outage = None
        while True:
            try:
                if self.protocol in ("s3", "s3a") and not self._bucket_checked.is_set():
                    self._check_bucket()
                result = operation()
            except FusionError:
                raise
            except Exception as e:
                failure = classify(e)
                if failure is None:
                    raise
                if not failure.transient:
                    raise FusionError(f"store {self.url}: cannot {what}: {failure.reason}") from None
                outage = outage or Outage(self.url, self.outage_seconds, self._outage_log)
                outage.wait(failure.reason)
                continue
            if outage is not None:
                outage.over()
            return result

    def _check_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except Exception as e:
            status, code = s3_error(e)
            if status == 404 or code in ("404", "NoSuchBucket") or isinstance(e, FileNotFoundError):
                raise FusionError(f"store {self.url}: bucket {bucket} does not exist (create it, or fix `store`)") from None
            raise
        self._bucket_checked.set()

    # ---- small objects ---------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._do(f"look for {rel}", lambda: self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes | None:
        def read():
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError:
                return None

        return self._do(f"read {rel}", read)

    def read_json(self, rel: str) -> dict | None:
        blob = self.read_bytes(rel)
        if blob is None:
            return None
        try:
            return json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FusionError(f"{self.uri(rel)}: not valid JSON ({e})") from None

    def write_bytes(self, rel: str, blob: bytes, exclusive: bool = False) -> bool:
        """Write an object whole. With exclusive=True it is `create`; returns whether the
        object now holds `blob`."""
        if exclusive:
            return self.create(rel, blob)
        path = self.path(rel)

        def write():
            if self.protocol == "file":
                os.replace(self._local_tmp(path, blob), path)
            else:
                self.fs.pipe_file(path, blob)
            return True

        return self._do(f"write {rel}", write)

    def create(self, rel: str, blob: bytes) -> bool:
        """Create-if-absent: write the object only if none exists. Returns True if the object
        now holds exactly `blob` (written by this call, or found identical: a retried
        conditional PUT whose first attempt succeeded looks like that), False if it holds
        something else."""
        path = self.path(rel)
        if self.protocol not in ("file", "s3", "s3a", "memory"):
            raise FusionError(f"store {self.url}: create-if-absent is not supported for {self.protocol}://")
        if self._do(f"create {rel}", lambda: self._create_once(path, blob)):
            return True
        return self.read_bytes(rel) == blob

    def _create_once(self, path: str, blob: bytes) -> bool:
        """One create-if-absent: True if this call wrote the object, False if one exists."""
        if self.protocol == "file":
            tmp = self._local_tmp(path, blob)
            try:
                os.link(tmp, path)  # fails if path exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.protocol == "memory":  # one process: check-then-write cannot race
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, blob)
            return True
        return self._s3_create(path, blob)

    def _s3_create(self, path: str, blob: bytes) -> bool:
        """A PUT with `If-None-Match: *`; True if it wrote, False if the key exists.

        The only precondition sent is "no object here", so any 412 PreconditionFailed means the
        object exists, whatever the error body says (s3fs recognizes it only when the body names
        the condition, which AWS and moto do and SeaweedFS and MinIO do not). A 409
        ConditionalRequestConflict (a concurrent write to the key was in flight) is retried: its
        outcome is then 201 or 412."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                self.fs.pipe_file(path, blob, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as e:
                status, code = s3_error(e)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if (status == 409 or code == "ConditionalRequestConflict") and attempt + 1 < CONFLICT_RETRIES:
                    time.sleep(min(0.05 * 2**attempt, 1.0) * (0.5 + random.random()))
                    continue
                raise
        raise AssertionError("unreachable")

    def write_json(self, rel: str, obj: object, exclusive: bool = False) -> bool:
        return self.write_bytes(rel, json_bytes(obj), exclusive=exclusive)

    def _local_tmp(self, path: str, blob: bytes, sync: bool = True) -> str:
        """The blob in a fresh temporary file beside `path`, to be renamed or linked into place.
        A write that fails (a full disk) removes its temporary file; one left by a killed process
        is never read (no record names it) and is swept when its part is committed
        (`sweep_temporaries`)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def sweep_temporaries(self, rel: str, older_than: float) -> list[str]:
        """Remove the temporary files (`_local_tmp`) under rel that are older than `older_than`
        seconds: left by killed processes, since a live write holds its own for moments only.
        File stores only (other stores put objects whole, leaving none). Returns what it removed."""
        folder = self.local_path(rel)
        if folder is None:
            return []

        def sweep():
            removed = []
            cutoff = time.time() - older_than
            for tmp in folder.rglob("*.tmp-*"):
                try:
                    if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                        tmp.unlink()
                        removed.append(tmp.relative_to(folder).as_posix())
                except FileNotFoundError:  # another process swept it first
                    pass
            return removed

        return self._do(f"remove stale temporary files under {rel}", sweep)

    # ---- many objects at once (a shard's arrays) ------------------------------------------
    def put_objects(self, objects: dict[str, bytes]) -> None:
        """Write several objects (concurrently where the filesystem can). On local disks they
        are not synced one by one: a killed process loses nothing written, and after a power
        loss a record whose data did not reach the disk fails its checks when read."""
        def put():
            if self.protocol == "file":
                for rel, blob in objects.items():
                    os.replace(self._local_tmp(self.path(rel), blob, sync=False), self.path(rel))
            elif objects:
                self.fs.pipe({self.path(rel): blob for rel, blob in objects.items()})

        first = next(iter(objects), "")
        self._do(f"write {first}" + (f" and {len(objects) - 1} more" if len(objects) > 1 else ""), put)

    def get_objects(self, rels: list[str]) -> dict[str, bytes | None]:
        """Read several objects (concurrently where the filesystem can); None where missing."""
        if not rels:
            return {}
        paths = [self.path(r) for r in rels]

        def get():
            if self.protocol == "file":
                got = {}
                for p in paths:
                    try:
                        got[p] = Path(p).read_bytes()
                    except FileNotFoundError:
                        got[p] = None
            else:
                got = self.fs.cat(paths, on_error="return")
                if not isinstance(got, dict):  # fsspec returns the bytes alone for a single path
                    got = {paths[0]: got}
            out = {}
            for rel, p in zip(rels, paths):
                value = got.get(p)
                if isinstance(value, FileNotFoundError) or value is None:
                    out[rel] = None
                elif isinstance(value, BaseException):
                    raise value
                else:
                    out[rel] = bytes(value)
            return out

        return self._do(f"read {rels[0]}" + (f" and {len(rels) - 1} more" if len(rels) > 1 else ""), get)

    def list(self, rel: str) -> list[str]:
        """Names directly under rel (empty if it does not exist). Some S3 servers (SeaweedFS)
        keep listing a folder whose objects were all removed: never take a listed folder for
        one that holds objects."""
        folder = self.path(rel).rstrip("/")

        def ls():
            try:
                return self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                return []

        entries = self._do(f"list {rel or 'the store'}", ls)
        # s3fs lists an emptied folder (that the server still keeps) as the folder itself
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != folder)

    def remove(self, rel: str) -> None:
        """Delete an object or a whole folder (nothing happens if it does not exist)."""
        def rm():
            try:
                self.fs.rm(self.path(rel), recursive=True)
            except FileNotFoundError:
                pass

        self._do(f"remove {rel or 'the store'}", rm)

    # ---- files and whole folders (model checkpoints) -----------------------------------
    def put_file(self, local: Path, rel: str) -> None:
        """Upload one local file to rel (streamed: checkpoint files can be large)."""
        self._do(f"write {rel}", lambda: self.fs.put_file(str(local), self.path(rel)))

    def get_file(self, rel: str, local: Path) -> None:
        """Download the object at rel to a local file (streamed)."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._do(f"read {rel}", lambda: self.fs.get_file(self.path(rel), str(local)))

    def find(self, rel: str) -> list[str]:
        """The objects under rel, as paths relative to it (empty if none)."""
        root = self.path(rel)

        def find():
            try:
                found = self.fs.find(root, detail=True)
            except FileNotFoundError:
                return {}
            return found

        found = self._do(f"list {rel}", find)
        return sorted(path[len(root) + 1 :] for path, info in found.items() if info.get("type") == "file")

    def put_dir(self, local_dir: Path, rel: str) -> None:
        """Upload a local folder's files to rel/ (replacing what is there)."""
        self.remove(rel)
        files = sorted(f for f in Path(local_dir).rglob("*") if f.is_file())
        self.put_objects({f"{rel}/{f.relative_to(local_dir).as_posix()}": f.read_bytes() for f in files})

    def get_dir(self, rel: str, local_dir: Path) -> Path:
        """Download rel/ into a local folder (for file:// stores, return the folder itself)."""
        if self.protocol == "file":
            return Path(self.path(rel))
        local_dir = Path(local_dir)
        for name in self.find(rel):  # one at a time: checkpoints can be larger than memory allows at once
            blob = self.read_bytes(f"{rel}/{name}")
            if blob is None:
                raise FusionError(f"{self.uri(rel)}/{name}: removed while being read")
            dest = local_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(blob)
        return local_dir


def json_bytes(obj: object) -> bytes:
    """The one JSON serialisation of records: sorted keys, so equal content gives equal bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
