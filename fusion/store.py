"""A run's store: one URL (a path, file://, memory://, s3://) seen through fsspec.

Everything a run produces lives under that URL; stages talk to it only through this module
and fusion.shards (the commit protocol). Paths given to a Store are relative to its root.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

from fusion.errors import FusionError


def normalize_url(url: str) -> str:
    """Plain paths become absolute file:// URLs; URLs pass through."""
    if "://" in url:
        return url.rstrip("/")
    return "file://" + str(Path(url).expanduser().resolve())


class Store:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = normalize_url(url)
        self.protocol = self.url.split("://", 1)[0]
        options = dict(storage_options or {})
        if self.protocol == "file":
            options.setdefault("auto_mkdir", True)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as e:
            raise FusionError(f"store {self.url}: cannot open ({e})") from None
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.url})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        """The path on this machine for file:// stores, else None."""
        return Path(self.path(rel)) if self.protocol == "file" else None

    # ---- small objects ---------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> dict | None:
        blob = self.read_bytes(rel)
        if blob is None:
            return None
        try:
            return json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FusionError(f"{self.uri(rel)}: not valid JSON ({e})") from None

    def write_bytes(self, rel: str, blob: bytes, exclusive: bool = False) -> bool:
        """Write an object whole: readers see the old object or the new one, never a part.

        With exclusive=True the write happens only if no object exists yet (create-if-absent)
        and the return value says whether this call created it.
        """
        path = self.path(rel)
        if self.protocol == "file":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            try:
                if exclusive:
                    try:
                        os.link(tmp, path)  # fails if path exists: create-if-absent
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return True
        if exclusive and self.fs.exists(path):
            return False
        self.fs.pipe_file(path, blob)
        return True

    def write_json(self, rel: str, obj: object, exclusive: bool = False) -> bool:
        blob = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        return self.write_bytes(rel, blob, exclusive=exclusive)

    def list(self, rel: str) -> list[str]:
        """Names directly under rel (empty if it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- arrays ------------------------------------------------------------------------
    def zarr_store(self, rel: str, read_only: bool = False):
        if self.protocol == "file":
            return LocalStore(self.path(rel), read_only=read_only)
        return FsspecStore.from_url(self.uri(rel), read_only=read_only, storage_options=self._options())

    def _options(self) -> dict:
        return getattr(self.fs, "storage_options", {}) or {}

    def open_group(self, rel: str, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.zarr_store(rel, read_only=mode == "r"), mode=mode)

    # ---- whole folders (model checkpoints) --------------------------------------------
    def put_dir(self, local_dir: Path, rel: str) -> None:
        """Upload a local folder's files to rel/ (replacing what is there)."""
        self.remove(rel)
        for f in sorted(Path(local_dir).rglob("*")):
            if f.is_file():
                self.write_bytes(f"{rel}/{f.relative_to(local_dir).as_posix()}", f.read_bytes())

    def get_dir(self, rel: str, local_dir: Path) -> Path:
        """Download rel/ into a local folder (for file:// stores, return the folder itself)."""
        if self.protocol == "file":
            return Path(self.path(rel))
        local_dir = Path(local_dir)
        for path in self.fs.find(self.path(rel)):
            name = path[len(self.path(rel)) + 1 :]
            dest = local_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.fs.cat_file(path))
        return local_dir
