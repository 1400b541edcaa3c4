"""Weight merging through mergekit: `fusion merge CONFIG OUT`.

CONFIG is a mergekit merge configuration (the YAML `mergekit-yaml` reads), run in-process
through mergekit's Python API, offline, on local model folders. The methods this project
tests and compares (bench/replicate.py), all on models of one architecture and tokenizer:

    linear        weighted average of the models (model soups); weights normalised to 1
    ties          TIES: task vectors against base_model trimmed to `density`, one sign elected
                  per entry, the agreeing entries averaged (Yadav et al. 2023)
    dare_ties     DARE: task vectors randomly dropped to `density` and rescaled, then TIES signs
    slerp         spherical interpolation between base_model and one other model at `t`
    model_stock   the interpolation ratio between base and the models' average chosen from the
                  angle between fine-tunes (Jang et al. 2024); needs base_model and 2+ models
    sce           select (top-k variance), calculate (weights), erase (minority signs): the
                  merge FuseChat uses after its pairwise fusion (Wan et al. 2024)

Any other mergekit method (passthrough, task_arithmetic, della, ...) runs as well. A merge is
written to a temporary folder beside OUT and renamed into place when complete, so OUT is
either absent or a whole model; the tokenizer of base_model (else the first model) travels
with it. Cost: every referenced model is read once, tensor by tensor; memory is a few
tensors of each model at a time (mergekit's lazy loader), not whole models.

    models:
      - {model: models/exp-a, parameters: {weight: 1.0}}
      - {model: models/exp-b, parameters: {weight: 3.0}}
    merge_method: linear
    dtype: float32
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import yaml

from fusion.errors import FusionError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub

TESTED_METHODS = ("linear", "ties", "dare_ties", "slerp", "model_stock", "sce")


def read_config(path: str | Path) -> dict:
    """A merge configuration file as a mapping (YAML)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FusionError(f"{path}: no such merge configuration") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FusionError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FusionError(f"{path}: expected a mapping of keys at the top level")
    return data


def require_mergekit() -> None:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise FusionError("merging needs mergekit: pip install 'fusion-llm[merge]'") from None


def parse_config(data: dict, source: str = "merge config"):
    """mergekit's MergeConfiguration, with the checks mergekit leaves out: no unknown keys,
    every model a local model folder."""
    require_mergekit()
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    unknown = sorted(set(data) - set(MergeConfiguration.model_fields))
    if unknown:
        raise FusionError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(MergeConfiguration.model_fields)})")
    try:
        config = MergeConfiguration.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise FusionError(f"{source}: key '{key}': {first['msg']}") from None
    except (ValueError, RuntimeError) as err:
        raise FusionError(f"{source}: {err}") from None
    for ref in config.referenced_models():
        if ref.lora is not None:
            raise FusionError(f"{source}: model {ref.model.path}: LoRA adapters are not supported here")
        if not (Path(ref.model.path) / "config.json").is_file():
            raise FusionError(f"{source}: model {ref.model.path} is not a local model folder (no config.json)")
    return config


def merge_models(data: dict, out: str | Path, seed: int = 0, device: str = "cpu", source: str = "merge config") -> Path:
    """Run the merge `data` (a mergekit configuration mapping) into the folder `out`, whole or not at all."""
    from mergekit.merge import MergeOptions, run_merge

    config = parse_config(data, source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    options = MergeOptions(device=device, random_seed=seed, quiet=True, copy_tokenizer=True,
                           clone_tensors=True,  # a layer used twice (passthrough slices) is written twice
                           write_model_card=False, lazy_unpickle=False)
    try:
        run_merge(config, str(tmp), options)
    except Exception as e:  # mergekit raises plain exceptions for bad combinations; name the cause in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise FusionError(f"{source}: mergekit could not merge ({type(e).__name__}: {e})") from None
    (tmp / "merge_config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    replace_folder(tmp, out)
    return out


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder `tmp` at `out`; an older `out` is moved aside first and removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- command line ---------------------------------------------------------------------------------
def add_cli(sub) -> None:
    p = sub.add_parser("merge", help="merge same-architecture models with mergekit (linear, ties, dare_ties, slerp, "
                                     "model_stock, sce, ...) from a mergekit YAML")
    p.add_argument("config", help="mergekit merge configuration (YAML); model paths are local folders")
    p.add_argument("out", help="output model folder (replaced once the merge is complete)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random methods (dare_*)")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="where mergekit does the arithmetic: cpu or cuda")


def run_cli(args) -> int:
    out = merge_models(read_config(args.config), args.out, args.seed, args.device, source=args.config)
    print(f"[fusion] merged into {out}")
    return 0
