"""A run: its spec, its store and its models.

The stages of a run, its topology and the config hash of every output belong to the pipeline
(fusion/pipeline.py), which `fusion.pipeline.open_run` attaches as `run.pipeline`; `run.hash`
only asks it, so that stage code can reach the hashes of what it reads and writes.
"""

from __future__ import annotations

import hashlib
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


class Run:
    def __init__(self, spec: RunSpec, store_url: str | None = None):
        self.spec = spec
        self.store = Store(store_url or spec.store, spec.store_options)
        self.pipeline = None  # the Pipeline, once fusion.pipeline.attach gave it one
        self._models_built = False

    def hash(self, stage: str, part: str) -> str:
        """The config hash of output stage/part (see fusion/pipeline.py)."""
        if self.pipeline is None:
            raise FusionError("this Run has no pipeline: open it with fusion.pipeline.open_run(spec)")
        return self.pipeline.hash(stage, part)

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

    def build_models(self) -> None:
        """Build (once, cached) the run's built-in `tiny:` models; other models are folders already."""
        if not self._models_built:
            for m in self.spec.models.all():
                if m.path.startswith("tiny:"):
                    models.build_model(m)
            self._models_built = True

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
        """What identifies a model's weights without reading gigabytes: config and file sizes,
        and for a built target (`init`) how it is built from them, so nothing is built here."""
        spec = self.model(name)
        folder = models.path_dir(spec)
        weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        identity = {
            "path": spec.path,
            "dtype": spec.dtype,
            "config": json.loads((folder / "config.json").read_text()),
            "weights": weights,
            "tokenizer": self.tokenizer_hash(name),
        }
        init = getattr(spec, "init", None)
        if init is not None:
            identity["init"] = init.model_dump(mode="json")
        return identity

    def spec_hash(self) -> str:
        return fingerprint(self.spec.model_dump(mode="json", by_alias=True))

    def owner(self) -> dict:
        """The run's identity in run.json (fusion/ownership.py): its name, its run id
        ($FUSION_RUN_ID, which the chart sets to NAMESPACE/RELEASE; else "local") and the hash of
        its spec without how the store is reached (`store`, `store_options`)."""
        spec = self.spec.model_dump(mode="json", by_alias=True)
        spec.pop("store", None)
        spec.pop("store_options", None)
        return {"run": self.spec.name, "run_id": os.environ.get(RUN_ID_ENV) or LOCAL_RUN_ID, "spec_hash": fingerprint(spec)}

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
        if self.spec.eval.lm_eval.tasks:
            from fusion import harness

            harness.check(self.spec.eval.lm_eval)
