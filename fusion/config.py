"""The run spec: one YAML file describes a whole fusion run.

These pydantic models are the single source of truth: the local launcher validates a spec
with them, and the Helm chart's values.schema.json is generated from them. Unknown keys are
errors, and every error names the key that is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.errors import FusionError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"  # usable as a store folder and a k8s name
NAME_IN_WORDS = (
    "1 to 40 lowercase letters, digits and '-', starting and ending with a letter or digit "
    "(it names store folders and Kubernetes objects)"
)


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


class UpscaleSpec(Strict):
    """Depth up-scaling (SOLAR): two copies of the n-layer model, the last `drop` layers removed
    from the first and the first `drop` from the second, stacked into 2(n - drop) layers."""

    drop: int = Field(ge=0, description="m: layers dropped from each copy (0 <= m < n); the result has 2(n - m) layers.")


class TargetInitSpec(Strict):
    upscale: UpscaleSpec = Field(description="Depth up-scaling of the target model before anything reads it.")


class TargetSpec(ModelSpec):
    """The target model; optionally initialised from `path` by a transformation (fusion/upscale.py)."""

    init: TargetInitSpec | None = Field(
        None, description="Build the target from `path` first: {upscale: {drop: m}}. Every stage then sees "
        "the built model (its logits, training and evaluation), so 'up-scale, then fuse' is one run."
    )


class ModelsSpec(Strict):
    target: TargetSpec
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
    top_k: int = Field(10, ge=1, le=255, description="Entries kept per position (with either method).")
    method: Literal["top-k", "sampled"] = Field(
        "sampled",
        description="top-k: the k most probable tokens with their log-probs and the mass outside them "
        "(a biased target: the loss must guess how the outside mass is spread); sampled: k distinct tokens "
        "drawn from the model's distribution with importance weights, an unbiased estimate of the whole "
        "distribution in the same bytes (fusion/scoring.py: sampled_rows).",
    )
    continuations: int = Field(
        4, ge=0, le=255,
        description="Entries kept per byte boundary inside a position's real token (its continuation rows: what "
        "the model says follows the bytes written so far; they let a target whose boundaries fall inside this "
        "model's tokens be taught there). 0: none.",
    )
    batch_tokens: int = Field(16384, ge=64, description="Tokens per forward batch, padding included.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the forward pass; auto: bfloat16 on GPUs, the model's dtype on CPUs."
    )


class AlignSpec(Strict):
    mode: Literal["default", "reference-hard", "reference-soft"] = Field(
        "default",
        description="default: byte-exact alignment that fixes the original's defects; "
        "reference-hard / reference-soft: the FuseLLM paper code, exactly.",
    )
    workers: int | None = Field(None, ge=1, description="Threads per align task; default all cores.")


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


# DeepSpeed config keys that the train settings own; `train.deepspeed` may not set them.
DEEPSPEED_OWNED = {
    "optimizer": "the trainer (AdamW with train.lr, train.weight_decay)",
    "scheduler": "the trainer (train.warmup_steps, train.min_lr_ratio: warm-up then cosine)",
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size / (world size x train.micro_batch_size)",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.precision",
    "fp16": "train.precision (bf16 or fp32 only)",
    "zero_optimization.stage": "train.zero_stage",
}


class TrainSpec(Strict):
    lam: float = Field(0.5, alias="lambda", ge=0.0, le=1.0, description="Weight of the CLM loss.")
    temperature: float = Field(1.0, gt=0.0)
    loss: Literal["ce", "kl"] = "ce"
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket",
        description="bucket: the teacher's unlisted mass is one extra outcome; renormalize: softmax "
        "over the listed entries only (the original).",
    )
    epochs: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step (global, over all ranks).")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward pass and rank; default: the rank's whole share of the batch."
    )
    lr: float = Field(1e-5, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 42
    lanes: int = Field(
        8, ge=1, description="Streams of shards every global batch is drawn from (fusion/training/data.py). "
        "With the number of training ranks dividing it, each rank fetches and decodes only its own lanes' shards; "
        "a rank holds up to 2 * (window_shards + 1) shards per lane of its own. Part of the data order.",
    )
    window_shards: int = Field(
        1, ge=1, description="About this many shards' worth of blocks of a lane are shuffled together. Part of the data order.",
    )
    engine: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="torch: one plain process (the local tiny run); deepspeed: ZeRO data parallelism, "
        "one process per GPU started by torchrun (`fusion train`, the PyTorchJob entry).",
    )
    zero_stage: Literal[2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 shards optimizer states and gradients, 3 also the weights."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 mixed precision on CUDA, fp32 on CPU. Master weights are always fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra DeepSpeed config merged into the generated one (e.g. zero_optimization.offload_optimizer). "
        "Keys the train settings own (optimizer, scheduler, batch sizes, clipping, precision, ZeRO stage) are refused.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in the store; older ones are deleted.")
    max_skipped_blocks: int = Field(
        100, ge=0, description="Blocks with non-finite teacher data are skipped and counted; more than this aborts."
    )

    @field_validator("deepspeed")
    @classmethod
    def _no_owned_deepspeed_keys(cls, v: dict) -> dict:
        for key, owner in DEEPSPEED_OWNED.items():
            section, _, leaf = key.partition(".")
            present = section in v and (not leaf or (isinstance(v[section], dict) and leaf in v[section]))
            if present:
                raise ValueError(f"'{key}' is set by {owner}; a DeepSpeed block would silently replace it")
        return v

    def fingerprint(self) -> dict:
        """The settings that determine the trained weights (not how often to checkpoint, nor when to give up)."""
        out = self.model_dump(mode="json", by_alias=True)
        for key in ("checkpoint_every", "keep_checkpoints", "max_skipped_blocks"):
            out.pop(key)
        return out


class LmEvalSpec(Strict):
    """Downstream tasks of EleutherAI's lm-evaluation-harness (the `lm-eval` package, the `eval`
    extra), scored on the same models as bits per byte (fusion/harness.py)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names, e.g. [arc_easy, hellaswag] or [bbh]; none (the default): no "
        "downstream evaluation, and lm-eval need not be installed.",
    )
    include_path: str | None = Field(
        None, description="A folder of extra task YAMLs (e.g. local tasks whose data are local files)."
    )
    limit: int | None = Field(None, ge=1, description="Score at most this many items of each task.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per item; default each task's own.")
    batch_size: int = Field(8, ge=1, description="Requests per forward batch.")
    confirm_run_unsafe_code: bool = Field(
        False, description="Allow tasks that execute model-written code (humaneval, mbpp); lm-eval refuses them otherwise."
    )

    @field_validator("tasks")
    @classmethod
    def _tasks_named_once(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("a task name is empty")
        if len(set(v)) != len(v):
            raise ValueError(f"a task is named twice: {', '.join(sorted({t for t in v if v.count(t) > 1}))}")
        return v


class EvalSpec(Strict):
    max_blocks: int | None = Field(None, ge=1, description="Evaluate at most this many held-out blocks.")
    batch_tokens: int = Field(16384, ge=64)
    lm_eval: LmEvalSpec = LmEvalSpec()


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_IN_WORDS = "an environment variable's name: letters, digits and '_', not starting with a digit"
# What a pattern-checked value may hold, said in words instead of the regular expression.
PATTERN_IN_WORDS = {NAME_PATTERN: NAME_IN_WORDS, ENV_NAME_PATTERN: ENV_NAME_IN_WORDS}


class StoreOptionsSpec(Strict):
    """How to reach an s3:// store. Never secrets: only the NAMES of the environment variables
    (or the profile) that hold them, so that specs, run.json and logs can be shared freely.
    Unset fields fall back to the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
    AWS_REGION, web identity, instance metadata, ...)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio:9000; default AWS.")
    region: str | None = Field(None, description="S3 region.")
    profile: str | None = Field(None, description="Profile in the AWS shared config/credentials files.")
    access_key_id_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Name of the environment variable holding the access key id."
    )
    secret_access_key_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Name of the environment variable holding the secret key."
    )
    session_token_env: str | None = Field(
        None, pattern=ENV_NAME_PATTERN, description="Name of the environment variable holding a session token."
    )
    connect_timeout: float = Field(10.0, gt=0.0, description="Seconds to open a connection before retrying.")
    read_timeout: float = Field(120.0, gt=0.0, description="Seconds without response bytes before retrying.")
    max_attempts: int = Field(10, ge=1, description="Attempts per request (exponential back-off with jitter).")
    outage_seconds: float = Field(
        1800.0,
        ge=0.0,
        description="How long a process waits for an unreachable store (refused connections, timeouts, 5xx) "
        "before it exits with the retryable code 200; it logs a line a minute meanwhile.",
    )

    @model_validator(mode="after")
    def _keys_in_pairs(self):
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            raise ValueError("access_key_id_env and secret_access_key_env go together")
        return self


class CaptureSpec(Strict):
    """Where an earlier capture of the sources lives (fusion/capture.py)."""

    store: str | None = Field(
        None, description="A store holding a capture (split + every source's logits), e.g. an earlier run's store "
        "with the same sources, corpus and split settings; its matching shards are imported, not computed.",
    )
    store_options: StoreOptionsSpec = StoreOptionsSpec()


class RunSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    store: str = Field(description="Run store URL: a path, file://, memory:// or s3://.")
    store_options: StoreOptionsSpec = StoreOptionsSpec()
    models: ModelsSpec
    corpus: CorpusSpec
    split: SplitSpec = SplitSpec()
    logits: LogitsSpec = LogitsSpec()
    align: AlignSpec = AlignSpec()
    fuse: FuseSpec = FuseSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    capture: CaptureSpec = CaptureSpec()

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


def describe_validation_error(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """One line naming the key that is wrong, and where it came from: the spec file, or the
    `--set KEY=VALUE` override that set it."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    source = _override_of(key, overrides) or source
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{more}"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'{more}"
    if first["type"] == "string_pattern_mismatch":
        words = PATTERN_IN_WORDS.get(first.get("ctx", {}).get("pattern"))
        if words:
            return f"{source}: key '{key}': {first['input']!r} is not a valid value; it may hold {words}{more}"
    return f"{source}: key '{key}': {first['msg']}{more}"


def _override_of(key: str, overrides: list[str]) -> str | None:
    """The `--set` item that set `key` (or a mapping above it), if any; the last one wins."""
    for item in reversed(overrides):
        set_key_ = item.partition("=")[0]
        if key == set_key_ or key.startswith(set_key_ + ".") or set_key_.startswith(key + "."):
            return f"--set {item}"
    return None


def parse_spec(data: object, source: str = "run spec", overrides: list[str] = ()) -> RunSpec:
    if not isinstance(data, dict):
        raise FusionError(f"{source}: expected a mapping of keys at the top level")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as err:
        raise FusionError(describe_validation_error(err, source, list(overrides))) from None


def set_key(data: dict, key: str, value) -> None:
    """Set the dotted `key` (`train.lr`) of a spec mapping, creating mappings on the way."""
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise FusionError(f"{key}: '{p}' is not a mapping")
    node[leaf] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` overrides, value parsed as YAML (so numbers and booleans keep their type)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FusionError(f"--set {item!r}: expected KEY=VALUE")
        try:
            set_key(data, key, yaml.safe_load(raw))
        except FusionError as err:
            raise FusionError(f"--set {item!r}: {err}") from None
    return data


def load_spec(path: str | Path, overrides: list[str] = ()) -> RunSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FusionError(f"{path}: no such run spec") from None
    except IsADirectoryError:
        raise FusionError(f"{path}: is a folder, not a run spec file") from None
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
    return parse_spec(data, str(path), overrides)


def fingerprint(obj: object) -> str:
    """A stable hash of JSON-able data; the config hash of stage outputs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
