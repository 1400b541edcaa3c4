"""The pipeline: the stages in order, the topology of a run (each stage's parts, shard counts
and the outputs each part reads) and the config hash of every output.

A stage output's config hash covers exactly what determines its bytes: the stage's own
settings and the hashes of the outputs it reads. Changing the training lambda therefore
invalidates training and evaluation, but not the expensive logits.

    run = open_run(spec)                 # a Run (spec, store, models) with its pipeline
    run.pipeline.hash("align", "src")    # also run.hash(...), which the stage code calls
    run.pipeline.outputs()               # every output: config hash and shard count (run.json)

Hashing reads files only: a `tiny:` model must have been built first (Run.build_models, which
opening a run does), it is never built as a side effect of hashing.
"""

from __future__ import annotations

import importlib.metadata

from fusion import capture, ownership
from fusion.config import RunSpec, fingerprint
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import Stage, align, evaluate, fuse, logits, split, train, vocab

STAGES: dict[str, Stage] = {s.name: s for s in (split.STAGE, vocab.STAGE, logits.STAGE, align.STAGE, fuse.STAGE, train.STAGE, evaluate.STAGE)}
PACKAGES = ["fusion-llm", "torch", "transformers", "tokenizers", "numpy", "zarr", "numba", "deepspeed"]


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise FusionError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    return STAGES[name]


class Pipeline:
    """The stages of one run: its topology and config hashes (computed once, on demand)."""

    def __init__(self, run: Run):
        self.run = run
        self.stages = STAGES
        self._hashes: dict[tuple[str, str], str] = {}
        self.prepared = False  # prepare() ran in this process

    # ---- topology -----------------------------------------------------------------------
    def parts(self, name: str) -> list[str]:
        return stage(name).parts(self.run)

    def check_parts(self, name: str, parts: list[str] | None) -> list[str]:
        """The parts asked for (default: all of the stage's), each checked to exist."""
        known = self.parts(name)
        for part in parts or []:
            if part not in known:
                raise FusionError(f"stage {name} has no part {part!r} (parts: {', '.join(known)})")
        return list(parts or known)

    def inputs(self, name: str, part: str) -> list[tuple[str, str]]:
        return stage(name).inputs(self.run, part)

    def shard_count(self, name: str, part: str) -> int:
        return stage(name).shard_count(self.run, part)

    # ---- config hashes ------------------------------------------------------------------
    def hash(self, name: str, part: str) -> str:
        key = (name, part)
        if key not in self._hashes:
            self._hashes[key] = fingerprint({"stage": name, "part": part, **stage(name).fingerprint(self.run, part)})
        return self._hashes[key]

    def outputs(self) -> dict[str, dict]:
        """Every stage output ("stage/part"): its config hash and number of shards. Recorded in
        run.json (once the split is planned) so that a launcher can follow the run from the
        store alone, without loading models: the Kubernetes controller and `fusion status` do."""
        return {
            f"{name}/{part}": {"config_hash": self.hash(name, part), "shards": s.shard_count(self.run, part)}
            for name, s in self.stages.items()
            for part in s.parts(self.run)
        }

    # ---- preparing a run ----------------------------------------------------------------
    def prepare(self) -> None:
        """Everything cheap that can reject bad input, before any expensive work: the models and
        corpus are checked, every stage's plan made (split reads every document: empty or
        non-UTF-8 corpora fail here), and run.json written."""
        self.run.preflight()
        ownership.claim(self.run)  # another run's store, or changed settings, is refused here
        imported = capture.import_capture(self.run)  # before the plans: an imported plan is the plan
        if imported is not None and imported.shards:
            print(f"[fusion] capture: {sum(imported.shards.values())} shard(s) imported from "
                  f"{self.run.spec.capture.store} ({', '.join(f'{k} {v}' for k, v in imported.shards.items())})",
                  flush=True)
        for s in self.stages.values():
            if s.plan is not None:
                s.plan(self.run)
        self.write_record()
        self.prepared = True

    def prepare_for(self, name: str) -> None:
        """Prepare the run (once per process) before stage `name` runs, if the stage has a plan
        that the run's shard counts come from; the plan is made once, whoever comes first."""
        if stage(name).plan is not None and not self.prepared:
            self.prepare()

    def write_record(self) -> None:
        """run.json: the resolved spec, its hash, the package versions that ran it, and every
        output's config hash and shard count.

        Credentials never reach it: the spec holds none (they come from the environment)."""
        run = self.run
        record = {
            "owner": run.owner(),
            "spec": run.spec.model_dump(mode="json", by_alias=True),
            "spec_hash": run.spec_hash(),
            "store": run.store.url,
            "packages": {p: _version(p) for p in PACKAGES},
            "outputs": self.outputs(),
        }
        ownership.write(run, record)


def open_run(spec: RunSpec, store_url: str | None = None, build_models: bool = True) -> Run:
    """A run of `spec` with its pipeline (run.pipeline) and, unless told otherwise, its `tiny:`
    models built (a controller that only follows the store builds none)."""
    return attach(Run(spec, store_url), build_models)


def topology(spec: RunSpec) -> Pipeline:
    """The pipeline of `spec` for reading its topology (parts, inputs) only: no model is built,
    and a memory store stands in for the run's, which is never opened (`fusion plan` runs where
    the store may be unreachable or its credentials unset). Shard counts and hashes need the
    real run: open_run."""
    return open_run(spec, "memory://fusion-topology", build_models=False).pipeline


def attach(run: Run, build_models: bool = True) -> Run:
    """Give a Run its pipeline (once) and build its `tiny:` models, so that hashing only reads files."""
    if run.pipeline is None:
        run.pipeline = Pipeline(run)
    if build_models:
        run.build_models()
    return run


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
