"""`fusion plan SPEC`: what a run will take, stage by stage, before any GPU work.

Per stage and part: shards, tokens (each model's own), store bytes and, for the throughputs
given, GPU-hours (CPU core-hours for the CPU stages). Every input figure says where it came from:

- the corpus: scanned here (documents and characters) when `corpus.path` is readable, else
  `--tokens` (the target's) and `--documents`;
- text bytes per token of each model: measured on the first megabytes of the corpus with the
  model's own tokenizer when both are here, else `--bytes-per-token` (default 4.0, typical of
  English web text with 32k-50k vocabularies);
- stored bytes per token of each stage: from the commit records of a pilot run
  (`--pilot STORE`: the same spec on a small share of the corpus, e.g.
  `--set corpus.max_documents=2000`), else the figures measured on real text by
  bench/bench_bytes.py at top-k 10 (MEASURED, each with its source), scaled by top_k / 10;
- throughputs: `--throughput STAGE=TOKENS_PER_SECOND` (per GPU for logits, train and eval, per
  CPU core for align and fuse), else the tokens per second a pilot run's local timings show.

Blocks are estimated the way split cuts them: each document into pieces of at most
FILL * block_tokens tokens of its longest tokenization, so a document's last piece is on
average half full; shards as split plans them (CHARS_PER_TOKEN characters per token).

The rows are the parts of the run's pipeline (fusion/pipeline.py: `topology`, which opens no
store and builds no model). A spec that names a capture store (`capture.store`) imports the
split and the sources' logits from it (fusion/capture.py): those rows say so and charge no
GPU-hours (their bytes are still copied into the run's store).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fusion import capture
from fusion.corpus import FILL
from fusion.errors import FusionError
from fusion.pipeline import STAGES, topology
from fusion.stages.split import CHARS_PER_TOKEN

# Stored bytes per token at top-k 10 (split: per byte of text), and where each figure comes from:
# the stages whose stored bytes the plan sizes.
MEASURED = {
    "split": (0.28, "English prose (corpus-sotu-en) compressed as split stores it"),
    "logits": (20.0, "bench/bench_bytes.py, real text, top-k 10"),
    "align": (21.0, "assumed: about a model's own logits (bench/bench_bytes.py measures it)"),
    "fuse": (19.0, "bench/bench_bytes.py, real text, top-k 10"),
}
# sampled rows / top-k rows, stored logits bytes (bench/bench_bytes.py --methods: stories260K on
# held-out text): a row's sampled entries share one value, so their log-prob deltas are zeros
SAMPLED_LOGITS_RATIO = 0.76
DEFAULT_TEXT_BYTES_PER_TOKEN = 4.0
SAMPLE_CHARS = 2_000_000  # corpus characters tokenized to measure bytes per token
DECODED_BYTES_PER_ENTRY = 6  # a packed row entry in the trainer's memory: int32 id + float16 log-prob
DECODED_BYTES_PER_TOKEN = 6  # token id, entry count, tail, per packed token
OPTIMIZER_BYTES_PER_PARAM = 16  # a checkpoint: fp32 master weights, two fp32 Adam moments, bf16/fp32 weights
THROUGHPUT_STAGES = ("logits", "align", "fuse", "train", "eval")


@dataclass
class Row:
    stage: str
    part: str
    shards: int
    tokens: int
    store_bytes: float
    hours: float | None  # GPU-hours (CPU core-hours for align and fuse); None: no throughput known
    device: str  # "GPU" or "CPU"
    note: str = ""


@dataclass
class Plan:
    run: str
    store: str
    inputs: dict  # figure -> (value, where it came from)
    rows: list[Row] = field(default_factory=list)
    train: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "run": self.run,
            "store": self.store,
            "inputs": {k: {"value": v, "source": s} for k, (v, s) in self.inputs.items()},
            "stages": [r.__dict__ for r in self.rows],
            "train": self.train,
            "total": {
                "store_bytes": sum(r.store_bytes for r in self.rows),
                "gpu_hours": sum(r.hours or 0 for r in self.rows if r.device == "GPU"),
                "cpu_core_hours": sum(r.hours or 0 for r in self.rows if r.device == "CPU"),
            },
        }


# ---- what the corpus and the models are -----------------------------------------------------------
@dataclass
class Corpus:
    documents: int
    chars: int  # of the whole corpus (held-out documents included)
    blocks: float  # training blocks (estimate)
    heldout_share: float


@dataclass
class Scan:
    chars: list[int]  # per document
    train_bytes: list[int]  # UTF-8 bytes per training document (held-out ones left out)
    heldout_bytes: int
    sample: str  # the first SAMPLE_CHARS characters or so


def scan_corpus(spec) -> Scan | None:
    """Sizes of every document, split's held-out choice applied, when the corpus is readable."""
    from fusion.corpus import read_documents
    from fusion.stages.split import is_heldout

    scan = Scan([], [], 0, "")
    sample: list[str] = []
    try:
        for n, (text, _) in enumerate(read_documents(spec.corpus)):
            scan.chars.append(len(text))
            size = len(text.encode("utf-8"))
            if is_heldout(n, spec.corpus.heldout_fraction):
                scan.heldout_bytes += size
            else:
                scan.train_bytes.append(size)
            if sum(map(len, sample)) < SAMPLE_CHARS:
                sample.append(text)
    except (OSError, FusionError):
        return None
    scan.sample = "\n".join(sample)
    return scan


def text_bytes_per_token(spec, model, sample: str | None) -> float | None:
    """Bytes of UTF-8 text per token of the model's tokenizer on the sample, if it loads here."""
    from pathlib import Path

    if not sample or not Path(model.tokenizer or model.path).expanduser().is_dir():
        return None  # tiny:NAME would be built; a cluster path is not here
    try:
        from fusion.models import load_tokenizer

        tokenizer = load_tokenizer(model)
    except Exception:  # not here: a path on the cluster, a hub name offline, ...
        return None
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    return len(sample.encode("utf-8")) / max(1, len(ids))


def target_parameters(model) -> int | None:
    """Parameters of a model from its config alone (on the meta device), if the config is here."""
    from pathlib import Path

    if not (Path(model.path).expanduser() / "config.json").is_file():
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model.path)
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in module.parameters())
    except Exception:
        return None


def pilot_figures(url: str, spec) -> tuple[dict, dict]:
    """(stored bytes per token per stage, tokens per second per stage) of a pilot run's store;
    for split, whose rows are blocks, stored bytes per byte of text (its Stage's `stored_per`)."""
    from fusion import shards
    from fusion.store import Store

    store = Store(url, spec.store_options)
    pipeline = topology(spec)
    per_token, tokens = {}, {}
    for stage in MEASURED:
        per_text = STAGES[stage].stored_per == "byte of text"
        stored = rows = text = 0
        for part in pipeline.parts(stage):
            status = shards.part_status(store, stage, part)
            stored, rows = stored + status.stored_bytes, rows + status.rows
            tokens[stage] = tokens.get(stage, 0) + status.rows
            if per_text:
                text += sum(int(r["arrays"]["text"]["shape"][0]) for r in _records(store, stage, part))
        units = text if per_text else rows
        if units:
            per_token[stage] = stored / units
    if not per_token:
        raise FusionError(f"plan: --pilot {url} holds no committed stage output")
    timings = store.read_json("logs/local-timings.json") or {}
    speed = {}
    for stage in ("logits", "align", "fuse"):
        if timings.get(stage) and tokens.get(stage):
            speed[stage] = tokens[stage] / timings[stage]
    if timings.get("train"):
        log = _train_tokens(store)
        if log:
            speed["train"] = log / timings["train"]
    return {k: v for k, v in per_token.items() if v}, speed


def _records(store, stage: str, part: str) -> list[dict]:
    from fusion import shards

    out = []
    for i in sorted(shards.committed_indices(store, stage, part)):
        record = shards.read_record(store, stage, part, i)
        if record is not None and "arrays" in record:
            out.append(record)
    return out


def _train_tokens(store) -> int | None:
    import json

    blob = store.read_bytes("train/model/shard-00000.files/train_log.json")
    return sum(e["tokens"] for e in json.loads(blob)) if blob else None


def shards_of(lengths: list[int], budget: int) -> int:
    """Shards as split plans them: consecutive documents until their characters reach the budget."""
    count = size = 0
    for n in lengths:
        size += n
        if size >= budget:
            count, size = count + 1, 0
    return count + (size > 0)


# ---- the plan --------------------------------------------------------------------------------------
def make_plan(
    spec,
    *,
    tokens: float | None = None,
    documents: int | None = None,
    bytes_per_token: float | None = None,
    pilot: str | None = None,
    throughput: dict[str, float] | None = None,
    gpus: int = 1,
    target_params: float | None = None,
) -> Plan:
    throughput = dict(throughput or {})
    inputs: dict[str, tuple] = {}
    scanned = None if tokens is not None else scan_corpus(spec)
    models = spec.models.all()
    target = models[0]

    # text bytes per token, per model
    sample = scanned.sample if scanned else None
    bpt = {}
    for m in models:
        measured = text_bytes_per_token(spec, m, sample)
        if measured is not None:
            bpt[m.name] = (measured, "measured on a corpus sample with its tokenizer")
        else:
            default = bytes_per_token or DEFAULT_TEXT_BYTES_PER_TOKEN
            bpt[m.name] = (default, "--bytes-per-token" if bytes_per_token else "assumed (--bytes-per-token)")
    for m in models:
        inputs[f"text bytes per token: {m.name}"] = (round(bpt[m.name][0], 3), bpt[m.name][1])

    # the corpus, in UTF-8 bytes of text
    densest = min(v for v, _ in bpt.values())  # the tokenizer with the most tokens cuts the blocks
    cap = FILL * spec.split.block_tokens
    budget = spec.split.shard_blocks * spec.split.block_tokens * CHARS_PER_TOKEN
    if scanned:
        train_bytes, heldout_bytes = sum(scanned.train_bytes), scanned.heldout_bytes
        blocks = sum(math.ceil(n / (densest * cap)) for n in scanned.train_bytes if n)
        n_shards = shards_of(scanned.chars, budget)
        inputs["corpus"] = (f"{len(scanned.chars):,} documents, {train_bytes + heldout_bytes:,} bytes",
                            f"scanned {spec.corpus.path}")
    elif tokens is not None:
        heldout = spec.corpus.heldout_fraction
        train_bytes = tokens * bpt[target.name][0]
        heldout_bytes = train_bytes * heldout / (1 - heldout)
        blocks = train_bytes / densest / cap + (0.5 * documents * (1 - heldout) if documents else 0.0)
        if documents:
            blocks = max(blocks, documents * (1 - heldout))
        n_shards = max(1, math.ceil((train_bytes + heldout_bytes) / budget))
        inputs["corpus"] = (f"{tokens:,.0f} target tokens" + (f", {documents:,} documents" if documents else ""),
                            "--tokens" + (", --documents" if documents else " (blocks assume long documents: give --documents)"))
    else:
        raise FusionError(f"plan: corpus.path {spec.corpus.path} is not readable here; give its size with --tokens")
    chars = train_bytes + heldout_bytes
    train_tokens = {m.name: train_bytes / bpt[m.name][0] for m in models}
    heldout_tokens = {m.name: heldout_bytes / bpt[m.name][0] for m in models}

    # stored bytes per token per stage
    per_token = dict(MEASURED)
    for stage, k in (("logits", spec.logits.top_k), ("align", spec.logits.top_k), ("fuse", spec.fuse.top_k)):
        if k != 10:
            value, source = MEASURED[stage]
            per_token[stage] = (value * k / 10, f"{source}; scaled to top-k {k}")
    if spec.logits.method == "sampled":
        value, source = per_token["logits"]
        per_token["logits"] = (value * SAMPLED_LOGITS_RATIO, f"{source}; x{SAMPLED_LOGITS_RATIO} for sampled rows")
    if pilot:
        measured, speed = pilot_figures(pilot, spec)
        for stage, v in measured.items():
            per_token[stage] = (v, f"pilot {pilot}")
        for stage, v in speed.items():
            if stage not in throughput:
                throughput[stage] = v
                inputs[f"throughput {stage}"] = (round(v, 1), f"pilot {pilot} (its machine)")
    for stage in MEASURED:
        inputs[f"stored bytes per {STAGES[stage].stored_per}: {stage}"] = (round(per_token[stage][0], 2), per_token[stage][1])
    for stage, v in throughput.items():
        inputs.setdefault(f"throughput {stage}", (v, "--throughput"))

    def hours(stage: str, n_tokens: float) -> float | None:
        rate = throughput.get(stage)
        return n_tokens / rate / 3600 if rate else None

    # one row per part of the run's pipeline (split's two parts, written together, in one)
    pipeline = topology(spec)
    parts = pipeline.parts
    imported = set(capture.capture_parts(pipeline.run)) if spec.capture.store else set()
    from_capture = f"imported from capture store {spec.capture.store}"  # copied, not computed: no hours
    plan = Plan(spec.name, spec.store, inputs)
    add = plan.rows.append
    split_imported = {("split", part) for part in parts("split")} <= imported
    note = f"{round(blocks):,} training blocks" + (f"; {from_capture}" if split_imported else "")
    add(Row("split", "+".join(parts("split")), n_shards, round(train_tokens[target.name]), chars * per_token["split"][0],
            None, "CPU", note))
    for part in parts("vocab"):
        add(Row("vocab", part, 1, 0, 0.0, None, "CPU", "one mapping table"))
    for part in parts("logits"):
        n = train_tokens[part]
        if ("logits", part) in imported:
            add(Row("logits", part, n_shards, round(n), n * per_token["logits"][0], 0.0, "GPU", from_capture))
        else:
            add(Row("logits", part, n_shards, round(n), n * per_token["logits"][0], hours("logits", n), "GPU"))
    n_target = train_tokens[target.name]
    for part in parts("align"):
        add(Row("align", part, n_shards, round(n_target), n_target * per_token["align"][0],
                hours("align", train_tokens[part]), "CPU"))
    for part in parts("fuse"):
        add(Row("fuse", part, n_shards, round(n_target), n_target * per_token["fuse"][0], hours("fuse", n_target), "CPU"))

    t = spec.train
    steps = max(1, math.ceil(t.epochs * blocks / t.batch_size))
    trained = t.epochs * n_target
    params = target_params if target_params is not None else target_parameters(target)
    checkpoint = params * OPTIMIZER_BYTES_PER_PARAM if params else 0.0
    weights = params * (2 if target.dtype in ("bfloat16", "float16") else 4) if params else 0.0
    (part,) = parts("train")
    add(Row("train", part, 1, round(trained), checkpoint * t.keep_checkpoints + weights, hours("train", trained), "GPU",
            f"{steps:,} steps; {t.keep_checkpoints} checkpoints of {checkpoint / 1e9:,.0f} GB" if params
            else f"{steps:,} steps; checkpoints: give --target-params"))
    scored = 2 + len(spec.models.sources)  # the target before and after, every source
    eval_tokens = sum(heldout_tokens[m.name] for m in models) + heldout_tokens[target.name]
    if spec.eval.max_blocks:
        eval_tokens = min(eval_tokens, spec.eval.max_blocks * spec.split.block_tokens * scored)
    (part,) = parts("eval")
    add(Row("eval", part, 1, round(eval_tokens), 0.0, hours("eval", eval_tokens), "GPU", f"{scored} models scored"))

    own_lanes = t.lanes // math.gcd(t.lanes, gpus)
    held = own_lanes * 2 * (t.window_shards + 1)
    shard_tokens = n_target / n_shards
    decoded = shard_tokens * (DECODED_BYTES_PER_TOKEN + DECODED_BYTES_PER_ENTRY * spec.fuse.top_k)
    plan.train = {
        "processes": gpus,
        "steps": steps,
        "blocks": round(blocks),
        "tokens_per_step": round(trained / steps),
        "reader_shards_per_rank": min(held, n_shards),
        "reader_memory_per_rank_bytes": int(min(held, n_shards) * decoded),
        "lanes_divisible_by_processes": t.lanes % gpus == 0,
        "target_parameters": int(params) if params else None,
    }
    return plan


# ---- text ------------------------------------------------------------------------------------------
def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def format_plan(plan: Plan) -> str:
    out = [f"plan of run {plan.run} (store {plan.store})", "", "inputs:"]
    width = max(len(k) for k in plan.inputs)
    out += [f"  {k:<{width}}  {v!s:<22} {s}" for k, (v, s) in plan.inputs.items()]
    out += ["", f"{'stage':<7} {'part':<15} {'shards':>7} {'tokens':>15} {'store':>10} {'hours':>10}  notes"]
    for r in plan.rows:
        h = "-" if r.hours is None else f"{r.hours:,.1f} {r.device}"
        out.append(f"{r.stage:<7} {r.part:<15} {r.shards:>7,} {r.tokens:>15,} {size(r.store_bytes):>10} {h:>10}  {r.note}")
    total = plan.as_json()["total"]
    out.append(
        f"{'total':<7} {'':<15} {'':>7} {'':>15} {size(total['store_bytes']):>10} "
        f"{total['gpu_hours']:,.1f} GPU-hours, {total['cpu_core_hours']:,.1f} CPU core-hours (stages with a throughput)"
    )
    t = plan.train
    out += ["", f"train: {t['steps']:,} steps of {t['tokens_per_step']:,} tokens on {t['processes']} process(es); "
            f"the reader holds up to {t['reader_shards_per_rank']} packed shards ({size(t['reader_memory_per_rank_bytes'])}) per process"]
    if not t["lanes_divisible_by_processes"]:
        out.append(f"warning: train.lanes is not a multiple of {t['processes']} processes: ranks would fetch shards they share")
    missing = [s for s in THROUGHPUT_STAGES if not any(r.stage == s and r.hours is not None for r in plan.rows)]
    if missing:
        out.append(f"no throughput for: {', '.join(missing)} (--throughput STAGE=TOKENS_PER_S, or --pilot STORE)")
    return "\n".join(out)
