"""A run: the spec, its store, and the config hash of every stage output.

A stage output's config hash covers exactly what determines its bytes: the stage's own
settings and the hashes of the outputs it reads. Changing the training lambda therefore
invalidates training and evaluation, but not the expensive logits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from functools import cached_property
from pathlib import Path

from fusion import models
from fusion.config import ModelSpec, RunSpec, fingerprint
from fusion.errors import FusionError
from fusion.store import Store

RUN_RECORD = "run.json"
RUN_ID_ENV = "FUSION_RUN_ID"
LOCAL_RUN_ID = "local"
PACKAGES = ["fusion-llm", "torch", "transformers", "tokenizers", "numpy", "zarr", "numba", "deepspeed"]


class Run:
    def __init__(self, spec: RunSpec, store_url: str | None = None):
        self.spec = spec
        self.store = Store(store_url or spec.store, spec.store_options)
        self._hashes: dict[tuple[str, str], str] = {}

    # ---- models -------------------------------------------------------------------------
    @property
    def target(self) -> ModelSpec:
        return self.spec.models.target

    @property
    def sources(self) -> list[ModelSpec]:
        return self.spec.models.sources

    @property
    def fused_sources(self) -> list[ModelSpec]:
        """The sources whose distributions the fuse stage combines (fuse.sources; default all)."""
        names = self.spec.fuse.sources
        return self.sources if names is None else [self.model(n) for n in names]

    def model(self, name: str) -> ModelSpec:
        for m in self.spec.models.all():
            if m.name == name:
                return m
        raise FusionError(f"no model named '{name}' in the run spec")

    @cached_property
    def tokenizers(self) -> dict:
        return {m.name: models.load_tokenizer(m) for m in self.spec.models.all()}

    def tokenizer_hash(self, name: str) -> str:
        folder = models.tokenizer_dir(self.model(name))
        h = hashlib.sha256()
        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            f = folder / fname
            if f.exists():
                h.update(fname.encode() + f.read_bytes())
        return h.hexdigest()[:16]

    def model_identity(self, name: str) -> dict:
        """What identifies a model's weights without reading gigabytes: config and file sizes."""
        spec = self.model(name)
        folder = models.model_dir(spec)
        weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        return {
            "path": spec.path,
            "dtype": spec.dtype,
            "config": json.loads((folder / "config.json").read_text()),
            "weights": weights,
            "tokenizer": self.tokenizer_hash(name),
        }

    # ---- hashes -------------------------------------------------------------------------
    def hash(self, stage: str, part: str) -> str:
        key = (stage, part)
        if key not in self._hashes:
            from fusion.stages import STAGES

            self._hashes[key] = fingerprint({"stage": stage, "part": part, **STAGES[stage].fingerprint(self, part)})
        return self._hashes[key]

    # ---- the run record -----------------------------------------------------------------
    def write_record(self) -> None:
        """run.json: the resolved spec, its hash and the package versions that ran it.

        Credentials never reach it: the spec holds none (they come from the environment)."""
        record = {
            "owner": self.owner(),
            "spec": self.spec.model_dump(mode="json", by_alias=True),
            "spec_hash": self.spec_hash(),
            "store": self.store.url,
            "packages": {p: _version(p) for p in PACKAGES},
            "outputs": self.outputs(),
        }
        self.store.write_json(RUN_RECORD, record)

    def spec_hash(self) -> str:
        return fingerprint(self.spec.model_dump(mode="json", by_alias=True))

    def owner(self) -> dict:
        """The run's identity in run.json (fusion/ownership.py): its name, its run id
        ($FUSION_RUN_ID, which the chart sets to the Helm release; else "local") and the hash of
        its spec without how the store is reached (`store`, `store_options`)."""
        spec = self.spec.model_dump(mode="json", by_alias=True)
        spec.pop("store", None)
        spec.pop("store_options", None)
        return {"run": self.spec.name, "run_id": os.environ.get(RUN_ID_ENV) or LOCAL_RUN_ID, "spec_hash": fingerprint(spec)}

    def outputs(self) -> dict[str, dict]:
        """Every stage output ("stage/part"): its config hash and number of shards. Recorded in
        run.json (once the split is planned) so that a launcher can follow the run from the
        store alone, without loading models: the Kubernetes controller does."""
        from fusion.stages import STAGES

        return {
            f"{stage}/{part}": {"config_hash": self.hash(stage, part), "shards": module.shard_count(self, part)}
            for stage, module in STAGES.items()
            for part in module.parts(self)
        }

    def preflight(self) -> None:
        """Cheap checks that catch bad input before any expensive work."""
        from fusion.align import check_placeable, token_view

        for m in self.spec.models.all():
            models.check_model(m, self.tokenizers[m.name], self.spec.split.block_tokens)
            models.context_token_id(m, self.tokenizers[m.name])
            check_placeable(self.tokenizers[m.name], token_view(self.tokenizers[m.name], m.name), m.name)
        corpus = self.spec.corpus.path
        if not corpus.startswith("tiny:") and not Path(corpus).expanduser().exists():
            raise FusionError(f"corpus.path: {corpus} does not exist")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
