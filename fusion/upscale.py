"""Depth up-scaling (SOLAR, Kim et al. 2023): a deeper model initialised from an n-layer base.

Two copies of the base; the last m layers are dropped from the first copy and the first m from
the second; the rest are stacked, giving 2(n - m) layers:

    layers 0 .. n-m-1 of the base, then layers m .. n-1 of the base

(SOLAR 10.7B: n = 32, m = 8, 48 layers.) Embeddings, final norm and output layer are the
base's. The stacking is a mergekit passthrough merge of two slices (fusion/merge.py), so any
architecture mergekit knows works.

In a run spec it is the target's initialisation, `models.target.init: {upscale: {drop: m}}`:
every stage that reads the target (its logits, training, evaluation) sees the up-scaled model,
so "up-scale, then fuse" is one run. The up-scaled folder is built on first use under
$FUSION_CACHE_DIR/upscaled/ (default ~/.cache/fusion), keyed by the base's config, weight file
sizes and m, and reused. Cost: one pass over the base's weights and 2(n - m)/n times its size
on local disk; every machine that runs a stage on the target builds its own (identical) copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

from fusion.errors import FusionError


def layer_count(base: Path) -> int:
    config = json.loads((Path(base) / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise FusionError(f"upscale: {base}/config.json names no layer count (num_hidden_layers)")


def layer_plan(n: int, drop: int) -> list[int]:
    """Which base layer each of the 2(n - m) new layers is a copy of."""
    if not 0 <= drop < n:
        raise FusionError(f"upscale: drop must be in 0..{n - 1} for a base of {n} layers, got {drop}")
    return list(range(0, n - drop)) + list(range(drop, n))


def merge_config(base: Path, drop: int) -> dict:
    """The mergekit passthrough configuration that stacks the two copies."""
    n = layer_count(base)
    layer_plan(n, drop)  # checks drop
    return {
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, n - drop]}]},
            {"sources": [{"model": str(base), "layer_range": [drop, n]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }


def upscale(base: str | Path, drop: int, out: str | Path) -> Path:
    """Write the up-scaled model of `base` into `out` (whole or not at all)."""
    from fusion.merge import merge_models

    base = Path(base)
    if not (base / "config.json").is_file():
        raise FusionError(f"upscale: {base} is not a model folder (no config.json)")
    return merge_models(merge_config(base, drop), out, source=f"upscale of {base}")


def cache_key(base: Path, drop: int) -> str:
    h = hashlib.sha256()
    h.update((base / "config.json").read_bytes())
    for p in sorted(base.iterdir()):
        if p.suffix in (".safetensors", ".bin") or p.name.startswith("tokenizer"):
            h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    h.update(f"drop={drop}".encode())
    return h.hexdigest()[:16]


def upscaled_dir(base: Path, drop: int) -> Path:
    """The up-scaled model of `base`, built once per machine (see the module doc)."""
    from fusion.tiny import cache_dir

    folder = cache_dir() / "upscaled" / f"{base.name}-drop{drop}-{cache_key(base, drop)}"
    if (folder / "config.json").is_file():
        return folder
    tmp = upscale(base, drop, folder.parent / f".{folder.name}.build-{uuid.uuid4().hex[:8]}")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
