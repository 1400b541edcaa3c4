"""The run spec: one YAML file describes a whole fusion run.

These pydantic models are the single source of truth: the local launcher validates a spec
with them, and the Helm chart's values.schema.json is generated from them. Unknown keys are
errors, and every error names the key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.errors import FusionError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"  # usable as a store folder and a k8s name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class ModelSpec(Strict):
    """A causal LM: a local Hugging Face folder, or `tiny:NAME` for the built-in tiny examples."""

    name: str = Field(pattern=NAME_PATTERN, description="Short name; used for store folders.")
    path: str = Field(description="Local model folder (config.json + weights), or tiny:NAME.")
    tokenizer: str | None = Field(None, description="Tokenizer folder if not the model folder.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for inference and training."
    )


class ModelsSpec(Strict):
    target: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1, description="One or more source models.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [self.target.name] + [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    def all(self) -> list[ModelSpec]:
        return [self.target, *self.sources]


class CorpusSpec(Strict):
    path: str = Field(
        description="A .jsonl, .txt, .parquet file, a folder of them, a saved Hugging Face dataset "
        "folder, or a built-in corpus: tiny:python-stdlib (docstrings and code of this Python)."
    )
    text_field: str = Field("text", description="Field holding the text (jsonl, parquet, datasets).")
    domain_field: str | None = Field(None, description="Optional field naming each document's domain.")
    max_documents: int | None = Field(None, ge=1, description="Use only the first N documents.")
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents held out for evaluation."
    )


class SplitSpec(Strict):
    block_tokens: int = Field(
        2048, ge=16, description="Most tokens of any model's tokenizer in one block (BOS excluded)."
    )
    shard_blocks: int = Field(1024, ge=1, description="About this many blocks per shard.")


class LogitsSpec(Strict):
    top_k: int = Field(10, ge=1, le=255, description="Entries kept per position.")
    batch_tokens: int = Field(16384, ge=64, description="Tokens per forward batch, padding included.")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AlignSpec(Strict):
    mode: Literal["default", "reference-hard", "reference-soft"] = Field(
        "default",
        description="default: byte-exact alignment that fixes the original's defects; "
        "reference-hard / reference-soft: the FuseLLM paper code, exactly.",
    )
    workers: int | None = Field(None, ge=1, description="Processes per align task; default all cores.")


class FuseSpec(Strict):
    function: Literal["mince", "avgce"] = "mince"
    level: Literal["sequence", "token"] = "sequence"
    metric: Literal["nll_per_byte", "ce_per_token"] = Field(
        "nll_per_byte",
        description="How sources are compared: total NLL per byte of text (tokenizer-independent), "
        "or the paper's mean cross-entropy per own token.",
    )
    top_k: int = Field(10, ge=1, le=255, description="Entries kept in the fused distribution.")
    weighting: Literal["softmin", "paper"] = Field(
        "softmin",
        description="AvgCE weights: softmin exp(-cost / tau), or the paper's softmax(exp(-cost)).",
    )
    paper_rewards: bool = Field(
        False, description="Compare candidates as the original does: bfloat16 rewards, ties to the target."
    )
    sources: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of the sources to fuse (default: all). The others still get logits and "
        "alignments, so runs that fuse different subsets (single-source distillation, leave-one-out) "
        "share that work and train on exactly the same blocks.",
    )


class TrainSpec(Strict):
    lam: float = Field(0.9, alias="lambda", ge=0.0, le=1.0, description="Weight of the CLM loss.")
    temperature: float = Field(1.0, gt=0.0)
    loss: Literal["ce", "kl"] = "ce"
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket",
        description="bucket: the teacher's unlisted mass is one extra outcome; renormalize: softmax "
        "over the listed entries only (the original).",
    )
    epochs: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step (global).")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward pass.")
    lr: float = Field(1e-5, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 42
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")


class EvalSpec(Strict):
    max_blocks: int | None = Field(None, ge=1, description="Evaluate at most this many held-out blocks.")
    batch_tokens: int = Field(16384, ge=64)


class RunSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    store: str = Field(description="Run store URL: a path, file://, memory:// or s3://.")
    models: ModelsSpec
    corpus: CorpusSpec
    split: SplitSpec = SplitSpec()
    logits: LogitsSpec = LogitsSpec()
    align: AlignSpec = AlignSpec()
    fuse: FuseSpec = FuseSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _fused_sources_exist(self):
        known = [s.name for s in self.models.sources]
        for name in self.fuse.sources or []:
            if name not in known:
                raise ValueError(f"fuse.sources: '{name}' is not a source model (sources: {', '.join(known)})")
        if self.fuse.sources and len(set(self.fuse.sources)) != len(self.fuse.sources):
            raise ValueError("fuse.sources: a source is named twice")
        return self

    @field_validator("store")
    @classmethod
    def _store_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must not be empty")
        return v


def describe_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{more}"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'{more}"
    return f"{source}: key '{key}': {first['msg']}{more}"


def parse_spec(data: object, source: str = "run spec") -> RunSpec:
    if not isinstance(data, dict):
        raise FusionError(f"{source}: expected a mapping of keys at the top level")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as err:
        raise FusionError(describe_validation_error(err, source)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` overrides, value parsed as YAML (so numbers and booleans keep their type)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FusionError(f"--set {item!r}: expected KEY=VALUE")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FusionError(f"--set {item!r}: '{p}' is not a mapping")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_spec(path: str | Path, overrides: list[str] = ()) -> RunSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FusionError(f"{path}: no such run spec") from None
    except UnicodeDecodeError as e:
        raise FusionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FusionError(f"{path}:{where}: malformed YAML: {problem}") from None
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, list(overrides))
    return parse_spec(data, str(path))


def fingerprint(obj: object) -> str:
    """A stable hash of JSON-able data; the config hash of stage outputs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
