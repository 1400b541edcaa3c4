"""What differs between two builds of an image: two OCI image layouts (skopeo copy ... oci:DIR)
compared config by config and layer by layer, file by file inside the layers that differ.

    python3 images/compare.py BUILD_DIR/oci-one BUILD_DIR/oci-two

Prints the config fields that differ, then per differing layer the files only in one build
and the files in both whose content, mode, owner or modification time differ, grouped by
folder with a few examples each (standard library only: it runs on the build host).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections import defaultdict
from pathlib import Path


def blob(layout: Path, digest: str) -> Path:
    algorithm, value = digest.split(":", 1)
    return layout / "blobs" / algorithm / value


def manifest(layout: Path) -> dict:
    index = json.loads((layout / "index.json").read_text())
    return json.loads(blob(layout, index["manifests"][0]["digest"]).read_text())


def members(path: Path) -> dict[str, tuple]:
    """name -> (sha256 of the content or link target, mode, uid, gid, mtime)"""
    out = {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if m.isfile():
                content = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
            else:
                content = f"{m.type!r}:{m.linkname}"
            out[m.name.lstrip("./")] = (content, m.mode, m.uid, m.gid, int(m.mtime))
    return out


def folder(name: str) -> str:
    parts = name.split("/")
    return "/".join(parts[: min(len(parts) - 1, 6)]) or "/"


def report(title: str, names: list[str], show: int = 3) -> None:
    if not names:
        return
    groups = defaultdict(list)
    for n in names:
        groups[folder(n)].append(n)
    print(f"    {title}: {len(names)} file(s) in {len(groups)} folder(s)")
    for f, ns in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:12]:
        print(f"      {len(ns):6d}  {f}/  e.g. {', '.join(n.rsplit('/', 1)[-1] for n in ns[:show])}")


def main(one: str, two: str) -> int:
    a, b = Path(one), Path(two)
    ma, mb = manifest(a), manifest(b)
    ca, cb = json.loads(blob(a, ma["config"]["digest"]).read_text()), json.loads(blob(b, mb["config"]["digest"]).read_text())
    for key in sorted(set(ca) | set(cb)):
        if key not in ("rootfs", "history") and ca.get(key) != cb.get(key):
            print(f"config {key}: {json.dumps(ca.get(key))[:200]} vs {json.dumps(cb.get(key))[:200]}")
    if ca.get("history") != cb.get("history"):
        print("config history differs (created times or commands of the steps)")
    la, lb = ma["layers"], mb["layers"]
    print(f"layers: {len(la)} vs {len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb)):
        if x["digest"] == y["digest"]:
            print(f"  layer {i}: identical ({x['digest'][:19]}..., {x['size']:,} bytes)")
            continue
        print(f"  layer {i}: differs ({x['digest'][:19]}... {x['size']:,} bytes vs {y['digest'][:19]}... {y['size']:,} bytes)")
        fa, fb = members(blob(a, x["digest"])), members(blob(b, y["digest"]))
        report("only in the first build", sorted(set(fa) - set(fb)))
        report("only in the second build", sorted(set(fb) - set(fa)))
        common = sorted(set(fa) & set(fb))
        report("content differs", [n for n in common if fa[n][0] != fb[n][0]])
        report("mode or owner differs", [n for n in common if fa[n][1:4] != fb[n][1:4]])
        report("only the modification time differs", [n for n in common if fa[n][:4] == fb[n][:4] and fa[n][4] != fb[n][4]])
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
