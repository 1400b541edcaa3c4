"""Does knowledge fusion work, and what does it buy? A replication of FuseLLM on 2 CPU cores.

    python bench/replicate.py                  # everything, about 60 minutes on 2 idle cores
    python bench/replicate.py --quick          # a smoke run of the same code (minutes)
    python bench/replicate.py --methods mince-lambda0.0,upscale-mince   # only these trained methods
                                               # (and CLM); the report goes to replication[-quick]-subset.*
    python bench/replicate.py --scale train_epochs=2 --out runs/pilot   # another scale (a pilot);
                                               # the report goes to replication-custom.*

Three English domains: State of the Union addresses (prose), the Python 3.11 documentation
(technical prose with code), both from ../shared/assets, and this Python's standard-library
source code. Every domain is split by document into held-out text, the continual-training mix
and a pretraining pool, so no document is in two of them.

Models (transformers configs, built and trained here, real tokenizers from ../shared/assets;
every one 4 layers of width 128, Scale):

    name        architecture  tokenizer        pretrained on
    src-sotu    GPT-2         GPT-2            State of the Union      (heterogeneous sources:
    src-docs    Llama         Llama-2          Python docs              three architectures,
    src-code    GPT-NeoX      GPT-NeoX-20B     stdlib code              three vocabularies)
    target      Llama         Mistral-7B       a small mix of all three, briefly
    exp-sotu    Llama         Mistral-7B       the target, then State of the Union   (experts that
    exp-docs    Llama         Mistral-7B       the target, then Python docs          share the
    exp-code    Llama         Mistral-7B       the target, then stdlib code          target's weights' shape)

The sources see 2 M characters of their domain, the target 200 K per domain: they are experts,
far ahead of the target on their own domain, as the paper's 7B sources are on theirs. The
continual-training mix (40 K characters per domain) is small next to what the sources saw, and
the target passes over it 3 times (train_epochs), so the question is the paper's: does
the sources' knowledge, carried by their distributions on the mix, move the target further
than the mix's text alone?

Why this scale: the cost of a training step here is the 32k-50k-way output layer (every step
computes and differentiates a distribution over the whole vocabulary for each of its 2,048
tokens), which grows with the width, not the layers: 4 layers of width 128 cost what the former
2 did (timed: 0.9 to 1.1 times), width 256 cost 1.5 to 2 times. So the target gets twice the
layers and the budget goes to steps: 3 epochs over the mix (about 80 steps, 1.5 times the former
single epoch of twice the text) for every method and seed, and 5 more methods. The real
pretrained Llama in ../shared/assets/model-stories260K-llama (260K parameters, 512 pieces,
children's stories) is not used: on this held-out text it scores 3.2 bits per byte on State of
the Union and 6.0 on the docs and the code, worse than the target before any continual
training, so as a source it would be nobody's expert, and as a target it has no capacity.

The target is then trained on the mix (same steps, same data, same seed per repetition) under
every method, through the pipeline (`fusion.launch_local.run_all`). Lambda is the weight of the
CLM loss; the fusion loss gets 1 - lambda. Fusion is compared with single-source distillation
and the variants run at LAMBDA = 0.5 (see its comment):

    clm                lambda = 1: continual training on the text alone
    distill-<domain>   one source, src-<domain> (fuse.sources), MinCE between it and the target
    mince-lambda0.9    the three heterogeneous sources fused by MinCE at lambda 0.9 (the paper's),
    mince-lambda0.5    0.5 and 0.0: the sweep of what fusion buys against how much of the text's
    mince-lambda0.0    own signal is kept
    avgce              AvgCE instead of MinCE
    mince-sampled      the sources' rows sampled (logits.method: sampled, the same top_k entries per
                       row) instead of their top-k; its upstream store recomputes logits, vocab and
                       align; skipped with a note where fusion/config.py has no logits.method
    distill-sampled-<domain>  single-source distillation on the same sampled rows
and, once (the first of the seeds, Scale.variant_seeds), the variants that rank a design choice:
    mince-sampled-lambda0.9, mince-sampled-lambda0.2, avgce-sampled   the sweep on sampled rows
    clm-epochs6, mince-sampled-epochs6, distill-sampled-<domain>-epochs6   twice the steps
    mince-experts      the three experts fused instead (they share the target's tokenizer)
    mince-t2           teacher distributions at temperature 2 (train.temperature)
    mince-top32        32 entries per row captured and fused instead of 10 (logits.top_k, fuse.top_k)
    mince-reference    the paper's alignment (reference-soft: MinED vocabulary map)
    mince-exact        the paper's exact-match alignment (reference-hard: EM map)
    mince-paper        the original code's whole recipe: reference-soft alignment, MinCE by mean
                       CE per own token compared in bfloat16, top-k renormalised (no tail)
    mince-renormalize  MinCE, default alignment, the teacher's tail dropped by renormalising (as
                       the original) instead of kept as one outcome
    upscale-clm        the target depth-up-scaled first (SOLAR, models.target.init.upscale, drop
    upscale-mince      1: 6 layers), then CLM only / MinCE with the three sources (lambda 0.5)

and compared with what needs no training: the target before (and up-scaled), every source and
expert alone, mergekit merges of the experts (fusion/merge.py: linear, TIES, DARE-TIES, SLERP,
model stock, SCE), Mixtral-style mixtures of the experts (fusion/moe.py: routers from hidden
states, and the same routers briefly trained), and probability ensembles of the experts (one
vocabulary, exact) and of the heterogeneous sources (through the alignment, fusion/ensemble.py).
Crowd voting is a generation method, without bits per byte: bench/bench_vote.py measures it.

All variants share the upstream work: one store holds split, vocab, logits and align for all
six sources; each variant's store links those folders and computes only fuse and train (the
commit records' config hashes guarantee they are the same data). Other upstream stores link what
they share with it and compute the rest: reference-soft and reference-hard their own vocab and
align, sampled and top32 their own logits, vocab and align, upscale the up-scaled target's.

Metrics, per domain: bits per byte of the held-out text (tokenizer-independent) and the gap
closed, (CLM only - method) / (CLM only - the best source on that domain), the share of what the
best expert knows beyond the CLM-trained target that the method recovers; 3 training seeds (data
order), mean and standard deviation; for trained methods the paired differences from CLM only
and from the best single-source distillation on the domain (same seeds). Costs per method: wall
seconds of continual training (fuse + train) or of scoring (ensembles), target tokens trained on,
teacher tokens run forward to capture their distributions, and models run per predicted token.
Outputs: bench/results/replication.json (one record per method and domain, the learning curves),
replication.png (bits per byte, gap closed, learning curves, gap closed against inference cost),
replication.md (the tables). The work folder (--out, default runs/replicate) keeps models and
stores, so an interrupted run continues where it stopped. See bench/REPLICATION.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import resource
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `fusion`, also when run from elsewhere
ASSETS = REPO.parent / "shared" / "assets"
DOMAINS = ("sotu", "docs", "code")


# ---- the scale: every size in one place ----------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    hidden: int = 128  # every model: 4 layers of width 128 (see the module docstring for why)
    layers: int = 4
    block_tokens: int = 128  # longest block for any tokenizer, in pretraining and in the pipeline
    batch: int = 16  # sequences per optimizer step, everywhere
    source_steps: int = 250  # heterogeneous sources, from scratch on their domain
    target_steps: int = 100  # the target, from scratch on the pretraining mix
    expert_steps: int = 80  # experts, from the target on their domain
    pool_chars: int = 2_000_000  # per domain: what sources and experts train on
    target_chars: int = 200_000  # per domain: the target's pretraining mix
    mix_chars: int = 40_000  # per domain: the continual-training mix
    heldout_chars: int = 30_000  # per domain: evaluation text
    train_lr: float = 1e-3  # continual training: AdamW, 5 warm-up steps, cosine to lr / 10
    train_epochs: float = 3.0  # passes over the continual mix
    seeds: tuple[int, ...] = (1, 2, 3)
    variant_seeds: int = 1  # the first seeds only for the VARIANTS (methods that rank a design choice)
    top_k: int = 10  # entries per stored distribution, as in the paper
    ensemble_top_k: int = 64  # entries per aligned row in the cross-vocabulary ensemble
    upscale_drop: int = 1  # depth up-scaling of the 4-layer target: 2 (n - m) = 6 layers, SOLAR's 1.5x
    moe_prompts: int = 8  # pieces of each expert's domain whose hidden states set its router
    moe_prompt_chars: int = 400
    gate_steps: int = 40  # router training of the trained-gates mixture, on the continual mix


QUICK = Scale(hidden=128, layers=2, source_steps=30, target_steps=20, expert_steps=20, pool_chars=200_000,
              target_chars=30_000, mix_chars=12_000, heldout_chars=6_000, train_epochs=1.0, seeds=(1, 2),
              upscale_drop=0, gate_steps=10)


@dataclass(frozen=True)
class Recipe:
    architecture: str
    tokenizer: str  # asset folder
    domains: tuple[str, ...]
    steps: str  # which Scale field
    init: str | None = None  # start from this model instead of random weights
    lr: float = 3e-3
    seed: int = 0


RECIPES = {
    "target": Recipe("llama", "tok-mistral-7b-v0.1", DOMAINS, "target_steps", seed=0),
    "src-sotu": Recipe("gpt2", "tok-gpt2", ("sotu",), "source_steps", seed=1),
    "src-docs": Recipe("llama", "tok-llama2", ("docs",), "source_steps", seed=2),
    "src-code": Recipe("gpt_neox", "tok-gpt-neox-20b", ("code",), "source_steps", seed=3),
    "exp-sotu": Recipe("llama", "tok-mistral-7b-v0.1", ("sotu",), "expert_steps", init="target", lr=1e-3, seed=4),
    "exp-docs": Recipe("llama", "tok-mistral-7b-v0.1", ("docs",), "expert_steps", init="target", lr=1e-3, seed=5),
    "exp-code": Recipe("llama", "tok-mistral-7b-v0.1", ("code",), "expert_steps", init="target", lr=1e-3, seed=6),
}
SOURCES = ["src-sotu", "src-docs", "src-code"]
EXPERTS = ["exp-sotu", "exp-docs", "exp-code"]

# upstream store -> the spec overrides that make it (split, vocab, logits, align computed there;
# "upscale" gets its drop from the scale: upstream_overrides)
UPSTREAMS = {
    "default": {},
    "reference-soft": {"align.mode": "reference-soft"},
    "reference-hard": {"align.mode": "reference-hard"},
    "upscale": {},  # SOLAR: the target up-scaled
    "sampled": {"logits.method": "sampled"},  # the sources' rows sampled instead of their top-k
    "top32": {"logits.top_k": 32},
}

# The CLM weight at which fusion is compared with single-source distillation and the variants
# run (the sweep, 0.9 the paper's, 0.5 and 0.0, is of MinCE). At 0 a block whose best candidate
# is the target itself teaches nothing (a single source loses most blocks outside its domain);
# at 0.5 every block keeps the text's signal and the fusion loss has 5 times the paper's weight.
LAMBDA = 0.5
FUSED = {"fuse.sources": SOURCES, "train.lambda": LAMBDA}

# method -> (upstream store, spec overrides); every trained method runs once per seed, a VARIANT
# only for the first Scale.variant_seeds seeds
METHODS = {
    "clm": ("default", {"train.lambda": 1.0}),
    **{f"distill-{d}": ("default", {"fuse.sources": [f"src-{d}"], "train.lambda": LAMBDA}) for d in DOMAINS},
    "mince-lambda0.9": ("default", {**FUSED, "fuse.function": "mince", "train.lambda": 0.9}),
    "mince-lambda0.5": ("default", {**FUSED, "fuse.function": "mince", "train.lambda": 0.5}),
    "mince-lambda0.0": ("default", {**FUSED, "fuse.function": "mince", "train.lambda": 0.0}),
    "avgce": ("default", {**FUSED, "fuse.function": "avgce"}),
    "mince-sampled": ("sampled", {**FUSED, "fuse.function": "mince"}),
    **{f"distill-sampled-{d}": ("sampled", {"fuse.sources": [f"src-{d}"], "train.lambda": LAMBDA}) for d in DOMAINS},
    "mince-sampled-lambda0.9": ("sampled", {**FUSED, "fuse.function": "mince", "train.lambda": 0.9}),
    "mince-sampled-lambda0.2": ("sampled", {**FUSED, "fuse.function": "mince", "train.lambda": 0.2}),
    "avgce-sampled": ("sampled", {**FUSED, "fuse.function": "avgce"}),
    "mince-experts": ("default", {**FUSED, "fuse.sources": EXPERTS, "fuse.function": "mince"}),
    "mince-t2": ("default", {**FUSED, "fuse.function": "mince", "train.temperature": 2.0}),
    "mince-top32": ("top32", {**FUSED, "fuse.function": "mince", "fuse.top_k": 32}),
    "mince-reference": ("reference-soft", {**FUSED, "fuse.function": "mince"}),
    "mince-exact": ("reference-hard", {**FUSED, "fuse.function": "mince"}),
    "mince-paper": ("reference-soft", {**FUSED, "fuse.function": "mince", "fuse.metric": "ce_per_token",
                                       "fuse.paper_rewards": True, "train.tail": "renormalize"}),
    "mince-renormalize": ("default", {**FUSED, "fuse.function": "mince", "train.tail": "renormalize"}),
    "clm-epochs6": ("default", {"train.lambda": 1.0, "train.epochs": 6.0}),
    "mince-sampled-epochs6": ("sampled", {**FUSED, "fuse.function": "mince", "train.epochs": 6.0}),
    **{f"distill-sampled-{d}-epochs6": ("sampled", {"fuse.sources": [f"src-{d}"], "train.lambda": LAMBDA,
                                                    "train.epochs": 6.0}) for d in DOMAINS},
    "upscale-clm": ("upscale", {"train.lambda": 1.0}),
    "upscale-mince": ("upscale", {**FUSED, "fuse.function": "mince"}),
}
VARIANTS = {
    "mince-sampled-lambda0.9", "mince-sampled-lambda0.2", "avgce-sampled", "clm-epochs6", "mince-sampled-epochs6",
    *[f"distill-sampled-{d}-epochs6" for d in DOMAINS], "mince-experts", "mince-t2", "mince-top32", "mince-reference",
    "mince-exact", "mince-paper", "mince-renormalize", "upscale-clm", "upscale-mince",
}


def upstream_overrides(where: str, scale: Scale) -> dict:
    if where == "upscale":
        return {"models.target.init": {"upscale": {"drop": scale.upscale_drop}}}
    return UPSTREAMS[where]


def sampled_capture_exists() -> bool:
    """Whether this checkout's LogitsSpec has the `method` field (top-k or sampled rows)."""
    from fusion.config import LogitsSpec

    return "method" in LogitsSpec.model_fields


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------------
def documents(domain: str) -> list[tuple[str, str]]:
    """(document id, text) of a domain, in a fixed order."""
    if domain == "sotu":
        folder = ASSETS / "corpus-sotu-en"
        text = (folder / "sotu.txt").read_text(encoding="utf-8")
        index = [json.loads(line) for line in (folder / "sotu_index.jsonl").read_text().splitlines() if line.strip()]
        return [(r["id"], text[r["char_offset"] : r["char_offset"] + r["char_len"]]) for r in index]
    if domain == "docs":
        text = (ASSETS / "corpus-python311-docs-en" / "python311_docs.txt").read_text(encoding="utf-8")
        out = []
        for chunk in text.split("===== ")[1:]:  # each file starts with "===== <path> =====\n"
            header, _, body = chunk.partition("\n")
            out.append((header.removesuffix(" =====").strip(), body.strip()))
        return out
    if domain == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "tkinter",
                "ensurepip", "__pycache__"}
        out = []
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if set(rel.parts[:-1]) & skip:
                continue
            try:
                out.append((rel.as_posix(), path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
        return out
    raise ValueError(domain)


def group_of(domain: str, doc_id: str) -> str:
    """Whole documents go to one group: 8 % held out, 12 % the continual mix, the rest the pool."""
    u = int.from_bytes(hashlib.sha256(f"{domain}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return "heldout" if u < 0.08 else "mix" if u < 0.20 else "pool"


def pieces(text: str, size: int) -> list[str]:
    """Text cut into pieces of at most `size` characters, at a line break or a space where one is
    in the second half of the piece."""
    out, start = [], 0
    while start < len(text):
        stop = min(len(text), start + size)
        if stop < len(text):
            for sep in ("\n", " "):
                at = text.rfind(sep, start + size // 2, stop)
                if at > start:
                    stop = at + 1
                    break
        piece = text[start:stop]
        if piece.strip():
            out.append(piece)
        start = stop
    return out


def take(docs: list[str], chars: int, seed: str, size: int = 4000) -> list[str]:
    """About `chars` characters of pieces of the documents, sampled evenly (shuffled, fixed seed)."""
    all_pieces = [p for d in docs for p in pieces(d, size)]
    random.Random(seed).shuffle(all_pieces)
    out, total = [], 0
    for p in all_pieces:
        if total >= chars:
            break
        out.append(p)
        total += len(p)
    return out


def prepare_data(scale: Scale) -> dict[str, dict[str, list[str]]]:
    """Per domain: heldout, mix, target (pretraining of the target) and pool pieces."""
    data = {}
    for domain in DOMAINS:
        groups = {"heldout": [], "mix": [], "pool": []}
        for doc_id, text in documents(domain):
            groups[group_of(domain, doc_id)].append(text)
        data[domain] = {
            "heldout": take(groups["heldout"], scale.heldout_chars, f"{domain}:heldout"),
            "mix": take(groups["mix"], scale.mix_chars, f"{domain}:mix"),
            "target": take(groups["pool"], scale.target_chars, f"{domain}:target"),
            "pool": take(groups["pool"], scale.pool_chars, f"{domain}:pool"),
        }
    return data


# ---- models ----------------------------------------------------------------------------------------
def tokenizer(asset: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / asset))


def build_model(name: str, scale: Scale, data: dict, models_dir: Path) -> Path:
    """Train model `name` once (RECIPES); a folder with a matching recipe.json is reused."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion import tiny

    recipe = RECIPES[name]
    steps = getattr(scale, recipe.steps)
    key = {"recipe": asdict(recipe), "steps": steps, "hidden": scale.hidden, "layers": scale.layers,
           "data": {d: getattr(scale, "target_chars" if name == "target" else "pool_chars") for d in recipe.domains},
           "init": None if recipe.init is None else json.loads((models_dir / recipe.init / "recipe.json").read_text())}
    key = json.loads(json.dumps(key))  # as recipe.json reads back (tuples become lists)
    folder = models_dir / name
    if (folder / "recipe.json").exists() and json.loads((folder / "recipe.json").read_text()) == key:
        return folder
    started = time.perf_counter()
    tok = tokenizer(recipe.tokenizer)
    part = "target" if name == "target" else "pool"
    texts = [p for d in recipe.domains for p in data[d][part]]
    random.Random(name).shuffle(texts)
    if recipe.init is None:
        model = tiny.make_model(recipe.architecture, len(tok), scale.hidden, scale.layers, tok, seed=recipe.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(models_dir / recipe.init), dtype=torch.float32)
    tiny.pretrain(model, tok, texts, steps, batch=scale.batch, lr=recipe.lr, seed=recipe.seed, progress=name)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tokens = steps * scale.batch * (tiny.BLOCK + 1)
    build = {"wall_s": round(time.perf_counter() - started, 1), "tokens": tokens}
    (folder / "build.json").write_text(json.dumps(build))
    (folder / "recipe.json").write_text(json.dumps(key, indent=1))  # written last: the model is complete
    log(f"built {name} ({recipe.architecture}, {recipe.tokenizer}, {steps} steps) in {time.perf_counter() - started:.0f} s")
    return folder


# ---- the pipeline ----------------------------------------------------------------------------------
def base_spec(scale: Scale, out: Path, models: dict[str, Path]) -> dict:
    return {
        "name": "replicate",
        "store": str(out / "stores" / "default"),
        "models": {
            "target": {"name": "target", "path": str(models["target"])},
            "sources": [{"name": n, "path": str(models[n])} for n in SOURCES + EXPERTS],
        },
        "corpus": {"path": str(out / "data" / "mix.jsonl"), "domain_field": "domain", "heldout_fraction": 0.0},
        "split": {"block_tokens": scale.block_tokens, "shard_blocks": 4096},
        "logits": {"top_k": scale.top_k, "batch_tokens": 4096, "device": "cpu"},
        "align": {"mode": "default"},
        "fuse": {"function": "mince", "level": "sequence", "metric": "nll_per_byte", "top_k": scale.top_k},
        "train": {"lambda": 0.9, "epochs": scale.train_epochs, "batch_size": scale.batch, "lr": scale.train_lr,
                  "warmup_steps": 5, "min_lr_ratio": 0.1, "checkpoint_every": 10_000},
    }


def with_overrides(spec: dict, overrides: dict) -> dict:
    from fusion.config import set_key

    spec = json.loads(json.dumps(spec))
    for key, value in overrides.items():
        set_key(spec, key, value)
    return spec


def make_run(spec: dict, tokenizers: dict | None = None):
    from fusion.config import parse_spec
    from fusion.pipeline import open_run

    run = open_run(parse_spec(spec))
    if tokenizers is not None:
        run.__dict__["tokenizers"] = tokenizers  # Run.tokenizers is a cached_property: load them once
    return run


def link_upstream(store: Path, upstream: Path, stages: list[str]) -> None:
    """A store that shares `stages` of another by symbolic links (their records carry the config
    hashes, so a mismatch is an error, never silent reuse)."""
    for stage in stages:  # a stage folder, or one part of it ("logits/src-code")
        link = store / stage
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(upstream / stage, link.parent))


def upstream(spec: dict, scale: Scale, out: Path, tokenizers: dict, needed: set[str]) -> None:
    """split, vocab, logits, align for all sources (default mode); then, for the methods that
    need them, stores of their own that link what they share with the default one:
    reference-soft, reference-hard (split, logits; their own vocab and align), sampled and top32
    (split; their own logits, vocab and align), upscale (split, vocab, the sources' logits; the
    up-scaled target's logits and the alignments onto them)."""
    from fusion.launch_local import run_all

    default = out / "stores" / "default"
    run_all(make_run(spec, tokenizers), ["split", "vocab", "logits", "align"])
    shares = {"reference-soft": ["split", "logits"], "reference-hard": ["split", "logits"], "sampled": ["split"],
              "top32": ["split"], "upscale": ["split", "vocab", *[f"logits/{n}" for n in SOURCES + EXPERTS]]}
    for where in [w for w in shares if w in needed]:
        store = out / "stores" / where
        link_upstream(store, default, shares[where])
        run_all(make_run(with_overrides(spec, {"store": str(store), **upstream_overrides(where, scale)}), tokenizers),
                ["split", "vocab", "logits", "align"])


def train_variant(spec: dict, scale: Scale, out: Path, method: str, seed: int, tokenizers: dict) -> tuple[Path, dict]:
    """fuse + train of one method and seed in its own store; returns the trained model folder
    and the wall seconds of fuse and train when they were computed (kept beside the store, so a
    resumed run reports the first computation's times, not the skip's)."""
    from fusion.launch_local import run_all
    from fusion.stages import train

    where, overrides = METHODS[method]
    store = out / "stores" / "variants" / f"{method}-s{seed}"
    link_upstream(store, out / "stores" / where, ["split", "vocab", "logits", "align"])
    variant = with_overrides(spec, {**upstream_overrides(where, scale), **overrides, "store": str(store),
                                    "train.seed": seed})
    run = make_run(variant, tokenizers)
    timing_file = store.parent / f"{method}-s{seed}.timing.json"
    done_before = timing_file.exists()
    timings = run_all(run, ["fuse", "train"])
    if not done_before:
        timing_file.write_text(json.dumps(timings))
    return train.model_folder(run, store / "scratch"), json.loads(timing_file.read_text())


# ---- evaluation ------------------------------------------------------------------------------------
def heldout_blocks(data: dict, scale: Scale, tokenizers: list) -> dict[str, list[str]]:
    """Held-out text per domain as blocks that every tokenizer turns into at most block_tokens."""
    from fusion.corpus import split_text

    return {d: [b for p in data[d]["heldout"] for b in split_text(p, tokenizers, scale.block_tokens)] for d in DOMAINS}


def evaluate(folders: list[Path], blocks: dict[str, list[str]], scale: Scale, cache: Path, weights=None
             ) -> tuple[dict, float]:
    """Bits per byte per domain of a model (one folder) or of an ensemble (several; the first is
    the base where vocabularies differ), and the wall seconds the scoring took. Results are
    cached by the models' weights files (with the seconds of the first computation)."""
    from fusion.ensemble import bits_per_byte, load_member, score_texts

    ident = hashlib.sha256()
    for f in folders:
        ident.update(f.name.encode() + (f / "model.safetensors").read_bytes())
    ident.update(json.dumps([weights, scale.ensemble_top_k, {d: len(b) for d, b in blocks.items()}]).encode())
    path = cache / f"{ident.hexdigest()[:24]}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        return cached["bits_per_byte"], cached["wall_s"]
    started = time.perf_counter()
    weights = weights or [1.0] * len(folders)
    members = [load_member(f, weight=w) for f, w in zip(folders, weights)]
    result = {}
    for d, texts in blocks.items():
        nll = score_texts(members, texts, top_k=scale.ensemble_top_k, batch_tokens=2048)
        result[d] = bits_per_byte(nll, texts)
    wall = round(time.perf_counter() - started, 1)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bits_per_byte": result, "wall_s": wall}))
    return result, wall


def merge_configs(models: dict[str, Path], out: Path) -> dict[str, list[dict]]:
    """method -> the mergekit configurations that make it, in order (SLERP takes two models at
    a time: the third expert joins the first two's midpoint at t = 1/3, so each weighs 1/3)."""
    experts = [str(models[n]) for n in EXPERTS]
    base = str(models["target"])

    def of(method: str, params: dict | None = None, **extra) -> dict:
        return {"merge_method": method, "dtype": "float32", **extra,
                "models": [{"model": m, **({"parameters": params} if params else {})} for m in experts]}

    pair = str(out / "models" / "merge-slerp-pair")
    return {
        "merge-linear": [of("linear", {"weight": 1.0})],
        "merge-ties": [of("ties", {"weight": 1.0, "density": 0.2}, base_model=base)],
        "merge-dare-ties": [of("dare_ties", {"weight": 1.0, "density": 0.5}, base_model=base)],
        "merge-slerp": [
            {"merge_method": "slerp", "dtype": "float32", "base_model": experts[0], "parameters": {"t": 0.5},
             "models": [{"model": experts[0]}, {"model": experts[1]}], "out": pair},
            {"merge_method": "slerp", "dtype": "float32", "base_model": pair, "parameters": {"t": 1 / 3},
             "models": [{"model": pair}, {"model": experts[2]}]},
        ],
        "merge-model-stock": [of("model_stock", base_model=base)],
        "merge-sce": [of("sce", {"weight": 1.0}, base_model=base, parameters={"select_topk": 0.2})],
    }


def merges(models: dict[str, Path], out: Path) -> dict[str, Path]:
    """Every merge of the experts through mergekit (fusion.merge), made once per expert set."""
    from fusion.merge import merge_models

    folders = {}
    for method, steps in merge_configs(models, out).items():
        folder = out / "models" / method
        key = hashlib.sha256(b"".join((models[n] / "recipe.json").read_bytes() for n in EXPERTS)).hexdigest()
        key += json.dumps(steps, sort_keys=True)
        if not (folder / "key.txt").exists() or (folder / "key.txt").read_text() != key:
            for step in steps:
                config = {k: v for k, v in step.items() if k != "out"}
                merge_models(config, step.get("out", folder), seed=0)
            (folder / "key.txt").write_text(key)
        folders[method] = folder
    return folders


def moe_configs(models: dict[str, Path], data: dict, scale: Scale, out: Path) -> dict[str, dict]:
    """method -> the mergekit-moe configuration (plus `train_gates`) of each mixture of the
    experts: routers from hidden states of pieces of each expert's pretraining domain, and the
    same routers then briefly trained on the continual mix (written to <out>/data/mix.txt)."""
    mix_text = out / "data" / "mix.txt"
    mix_text.parent.mkdir(parents=True, exist_ok=True)
    mix_text.write_text("\n\n".join(p for d in DOMAINS for p in data[d]["mix"]))
    config = {"base_model": str(models["target"]), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
              "experts": [{"source_model": str(models[f"exp-{d}"]),
                           "positive_prompts": [p[: scale.moe_prompt_chars] for p in data[d]["pool"][: scale.moe_prompts]]}
                          for d in DOMAINS]}
    trained = {**config, "train_gates": {"text": [str(mix_text)], "steps": scale.gate_steps, "lr": 1e-3,
                                         "batch": scale.batch}}
    return {"moe-hidden": config, "moe-trained": trained}


def mixtures(models: dict[str, Path], data: dict, scale: Scale, out: Path) -> dict[str, Path]:
    """Mixtral-style mixtures of the experts (fusion.moe) on the target's attention (moe_configs)."""
    from fusion.moe import build_moe

    folders = {}
    for method, cfg in moe_configs(models, data, scale, out).items():
        folder = out / "models" / method
        key = hashlib.sha256(b"".join((models[n] / "recipe.json").read_bytes() for n in ["target", *EXPERTS])).hexdigest()
        key += json.dumps(cfg, sort_keys=True)
        if not (folder / "key.txt").exists() or (folder / "key.txt").read_text() != key:
            build_moe(cfg, folder)
            (folder / "key.txt").write_text(key)
        folders[method] = folder
    return folders


# ---- report ----------------------------------------------------------------------------------------
GROUPS = [  # (method, kind, description), in the report's order
    ("target", "model", "the target before continual training"),
    ("clm", "trained", "continual training, CLM only (lambda = 1)"),
    *[(f"distill-{d}", "trained", f"single-source distillation from src-{d} (lambda = {LAMBDA:g})") for d in DOMAINS],
    ("mince-lambda0.9", "trained", "FuseLLM, MinCE, 3 heterogeneous sources, lambda = 0.9 (the paper's)"),
    ("mince-lambda0.5", "trained", "FuseLLM, MinCE, 3 heterogeneous sources, lambda = 0.5"),
    ("mince-lambda0.0", "trained", "FuseLLM, MinCE, 3 heterogeneous sources, lambda = 0 (fusion loss only)"),
    ("avgce", "trained", f"FuseLLM, AvgCE, 3 heterogeneous sources, lambda = {LAMBDA:g}"),
    ("mince-sampled", "trained", f"MinCE (lambda = {LAMBDA:g}) on sources' rows sampled instead of their top-k "
                                 "(logits.method: sampled)"),
    *[(f"distill-sampled-{d}", "trained", f"single-source distillation from src-{d} (lambda = {LAMBDA:g}), "
                                          "on its sampled rows") for d in DOMAINS],
    ("mince-sampled-lambda0.9", "trained", "MinCE on sampled rows, lambda = 0.9"),
    ("mince-sampled-lambda0.2", "trained", "MinCE on sampled rows, lambda = 0.2"),
    ("avgce-sampled", "trained", f"AvgCE (lambda = {LAMBDA:g}) on sampled rows"),
    ("mince-experts", "trained", f"MinCE (lambda = {LAMBDA:g}) over the 3 experts (same tokenizer as the target)"),
    ("mince-t2", "trained", f"MinCE (lambda = {LAMBDA:g}), teacher distributions at temperature 2"),
    ("mince-top32", "trained", f"MinCE (lambda = {LAMBDA:g}), top-32 rows captured and fused instead of top-10"),
    ("mince-reference", "trained", "MinCE, the paper's MinED alignment (reference-soft)"),
    ("mince-exact", "trained", "MinCE, the paper's exact-match alignment (reference-hard)"),
    ("mince-paper", "trained", "MinCE, the original recipe: reference-soft, CE per own token in bf16, "
                               "top-k renormalised"),
    ("mince-renormalize", "trained", "MinCE, default alignment, teacher tail renormalised away"),
    ("clm-epochs6", "trained", "CLM only, twice the steps (6 passes over the continual mix)"),
    ("mince-sampled-epochs6", "trained", f"MinCE on sampled rows (lambda = {LAMBDA:g}), twice the steps"),
    *[(f"distill-sampled-{d}-epochs6", "trained", f"distill-sampled-{d}, twice the steps") for d in DOMAINS],
    ("upscale-clm", "trained", "the target depth-up-scaled (SOLAR), then CLM only"),
    ("upscale-mince", "trained", f"the target depth-up-scaled (SOLAR), then MinCE (lambda = {LAMBDA:g}), 3 sources"),
    ("target-upscaled", "model", "the depth-up-scaled target before training"),
    *[(n, "model", f"source alone ({RECIPES[n].architecture}, {RECIPES[n].tokenizer})") for n in SOURCES],
    *[(n, "model", "expert alone (the target fine-tuned on one domain)") for n in EXPERTS],
    ("merge-linear", "merge", "mergekit linear merge (uniform average) of the 3 experts"),
    ("merge-ties", "merge", "mergekit TIES merge of the 3 experts on the target (density 0.2, weights 1)"),
    ("merge-dare-ties", "merge", "mergekit DARE-TIES merge of the 3 experts on the target (density 0.5, weights 1)"),
    ("merge-slerp", "merge", "mergekit SLERP of the 3 experts, pairwise: slerp(slerp(sotu, docs, 1/2), code, 1/3)"),
    ("merge-model-stock", "merge", "mergekit model stock of the 3 experts on the target"),
    ("merge-sce", "merge", "mergekit SCE merge of the 3 experts on the target (select_topk 0.2)"),
    ("moe-hidden", "moe", "Mixtral of the 3 experts' MLPs on the target's attention, top-2 routers from hidden states"),
    ("moe-trained", "moe", "the same mixture, routers then trained on the continual mix (all else frozen)"),
    ("ensemble-experts", "ensemble", "probability ensemble of the 3 experts (one vocabulary, exact)"),
    ("ensemble-sources", "ensemble", "probability ensemble of the 3 sources on src-docs tokens (aligned, top-64)"),
]


def models_per_token(method: str) -> int:
    """Inference cost: the models that run to predict one token (a mixture: its active experts)."""
    if method.startswith("ensemble-"):
        return 3
    if method.startswith("moe-"):
        return 2  # top-2 of 3 expert MLPs per layer, on one shared attention
    return 1


def records(values: dict[str, list[dict]], costs: dict[str, dict]) -> list[dict]:
    """One record per method and domain ("mean": the mean of the three domains): bits per byte,
    mean and standard deviation over seeds; the share of the gap between CLM only and the best
    source on the domain that the method closes; for trained methods the paired differences
    (same seed, same data order, which cancels most of the seed-to-seed variation) from CLM only
    and from the best single-source distillation on the domain; and the method's costs."""
    import numpy as np

    def per_run(run: dict, domain: str) -> float:
        return run[domain] if domain != "mean" else float(np.mean([run[d] for d in DOMAINS]))

    def std(xs) -> float:
        return round(float(np.std(xs, ddof=1)), 5) if len(xs) > 1 else 0.0

    def paired(xs: list[float], ref: str, domain: str) -> list[float]:
        """xs minus the same seeds of `ref` (a method run on fewer seeds ran the first ones)."""
        return [x - per_run(r, domain) for x, r in zip(xs, values[ref])]

    kinds = {m: (k, desc) for m, k, desc in GROUPS}
    sources = [s for s in SOURCES if s in values]
    best_source = {d: min(values[s][0][d] for s in sources) for d in DOMAINS} if sources else {}
    if best_source:
        best_source["mean"] = float(np.mean([best_source[d] for d in DOMAINS]))  # the best source per domain
    distills = [m for d in DOMAINS for m in (f"distill-{d}", f"distill-sampled-{d}")
                if len(values.get(m, [])) == len(values["clm"])]  # either capture: the best one is the bar
    out = []
    for method, runs in values.items():
        trained = kinds[method][0] == "trained"
        for domain in (*DOMAINS, "mean"):
            xs = [per_run(r, domain) for r in runs]
            rec = {"method": method, "kind": kinds[method][0], "description": kinds[method][1], "domain": domain,
                   "bits_per_byte": round(float(np.mean(xs)), 5), "std": std(xs), "n": len(xs),
                   "values": [round(x, 5) for x in xs]}
            if best_source:
                # a trained method against CLM only of the same seed, a built model against their mean
                clms = ([per_run(c, domain) for c in values["clm"]] if trained else
                        [float(np.mean([per_run(c, domain) for c in values["clm"]]))] * len(xs))
                gaps = [(c - x) / (c - best_source[domain]) for x, c in zip(xs, clms)]
                rec.update(gap_closed=round(float(np.mean(gaps)), 4), gap_closed_std=round(std(gaps), 4),
                           best_source_bits_per_byte=round(best_source[domain], 5))
            if trained and method != "clm":
                ds = paired(xs, "clm", domain)
                rec.update(delta_vs_clm=round(float(np.mean(ds)), 5), delta_std=std(ds))
            if trained and distills:
                best = min(distills, key=lambda m: np.mean([per_run(r, domain) for r in values[m]]))
                if method != best:
                    ds = paired(xs, best, domain)
                    rec.update(best_distill=best, delta_vs_distill=round(float(np.mean(ds)), 5),
                               delta_vs_distill_std=std(ds))
            rec.update(costs.get(method, {}), models_per_token=models_per_token(method))
            out.append(rec)
    return out


def _cell(value, std, n: int, fmt: str) -> str:
    return "" if value is None else (f"{value:{fmt}} ± {std:{fmt.lstrip('+')}}" if n > 1 else f"{value:{fmt}}")


def table(recs: list[dict]) -> str:
    """The results as markdown: bits per byte and gap closed per domain, the paired differences,
    the costs, and the methods that run one model per token side by side."""
    by = {(r["method"], r["domain"]): r for r in recs}
    methods = [m for m, _, _ in GROUPS if (m, "mean") in by]
    cols = (*DOMAINS, "mean")
    lines = ["Bits per byte of held-out text (mean ± std over seeds; lower is better) and the gap closed: "
             "(CLM only - method) / (CLM only - best source on the domain), paired by seed.", "",
             "| method | " + " | ".join(f"{d} bpb | {d} gap closed" for d in cols) + " | n |",
             "|---|" + "---:|" * (2 * len(cols) + 1)]
    for m in methods:
        cells = []
        for d in cols:
            r = by[(m, d)]
            cells.append(_cell(r["bits_per_byte"], r["std"], r["n"], ".3f"))
            gap = r.get("gap_closed")
            cells.append("" if gap is None else
                         f"{100 * gap:+.1f} %" + (f" ± {100 * r['gap_closed_std']:.1f}" if r["n"] > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {by[(m, 'mean')]['n']} |")
    lines += ["", "Paired differences in bits per byte (same seeds; negative: the method is better): from CLM only, "
              "and from the best single-source distillation on that domain (named).", "",
              "| method | " + " | ".join(f"{d} vs CLM | {d} vs distill" for d in cols) + " |",
              "|---|" + "---:|" * (2 * len(cols))]
    for m in [m for m in methods if by[(m, "mean")]["kind"] == "trained" and m != "clm"]:
        cells = []
        for d in cols:
            r = by[(m, d)]
            cells.append(_cell(r.get("delta_vs_clm"), r.get("delta_std"), r["n"], "+.4f"))
            cells.append("" if "delta_vs_distill" not in r else
                         _cell(r["delta_vs_distill"], r["delta_vs_distill_std"], r["n"], "+.4f")
                         + f" ({r['best_distill'].removeprefix('distill-')})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Costs: wall seconds of continual training (fuse + train, mean per seed); target tokens trained "
              "on; tokens the teachers ran forward on to capture their distributions (one pass over the mix per "
              "fused source); for what needs no training, the pretraining wall seconds of the models it is made "
              "of; wall seconds of scoring the held-out text (mean per seed); models run per predicted token.", "",
              "| method | train wall s | train tokens | teacher forward tokens | members' pretraining wall s "
              "| eval wall s | models per token |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        r = by[(m, "mean")]
        cells = [f"{r[k]:,.0f}" if r.get(k) is not None else ""
                 for k in ("train_wall_s", "train_tokens", "teacher_tokens", "build_wall_s", "eval_wall_s")]
        cells.append(str(r["models_per_token"]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    one = [m for m in methods if by[(m, "mean")]["models_per_token"] == 1 and m not in SOURCES
           and by[(m, "mean")].get("gap_closed") is not None]
    lines += ["", "At equal inference cost (one model per token), best mean gap closed first:", "",
              "| method | kind | " + " | ".join(f"{d} gap closed" for d in cols) + " | mean bpb |",
              "|---|---|" + "---:|" * (len(cols) + 1)]
    for m in sorted(one, key=lambda m: -by[(m, "mean")]["gap_closed"]):
        gaps = [f"{100 * by[(m, d)]['gap_closed']:+.1f} %" for d in cols]
        lines.append(f"| {m} | {by[(m, 'mean')]['kind']} | " + " | ".join(gaps)
                     + f" | {by[(m, 'mean')]['bits_per_byte']:.3f} |")
    return "\n".join(lines)


def learning_curves(train_logs: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Per trained method: the step log's CLM and fusion losses (nats per target token of the
    step's batch), averaged over the seeds that ran."""
    import numpy as np

    out = {}
    for method, logs in train_logs.items():
        steps = min(len(log) for log in logs)
        out[method] = {"step": list(range(1, steps + 1)), "seeds": len(logs),
                       **{k: [round(float(np.mean([log[i][k] for log in logs])), 4) for i in range(steps)]
                          for k in ("clm", "fusion")}}
    return out


def plot(recs: list[dict], curves: dict[str, dict], path: Path, title: str) -> None:
    """Row 1: bits per byte of every method per domain, ± std over seeds (off-scale bars are
    labelled). Row 2: the gap closed, ± std over seeds. Row 3: the training curves of CLM only
    and the fused methods (the CLM and fusion losses of each step's batch, smoothed), and the
    mean gap closed against inference cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["method"], r["domain"]): r for r in recs}
    methods = [m for m, _, _ in GROUPS if (m, "mean") in by]
    gapped = [m for m in methods if by[(m, "mean")].get("gap_closed") is not None and m not in SOURCES]
    colours = {"model": "#999999", "trained": "#1f77b4", "merge": "#2ca02c", "ensemble": "#d62728", "moe": "#9467bd"}
    fig, axes = plt.subplots(3, 4, figsize=(20, 17), gridspec_kw={"height_ratios": [len(methods), len(gapped), 12]})
    for col, domain in enumerate((*DOMAINS, "mean")):
        ax = axes[0, col]
        ys = np.array([by[(m, domain)]["bits_per_byte"] for m in methods])
        x = np.arange(len(methods))
        ax.barh(x, ys, xerr=[by[(m, domain)]["std"] for m in methods],
                color=[colours[by[(m, domain)]["kind"]] for m in methods])
        ax.set_yticks(x, methods if col == 0 else [""] * len(methods), fontsize=8)
        ax.invert_yaxis()
        ref = by[("clm", domain)]["bits_per_byte"]
        ax.axvline(ref, color="black", lw=0.8, ls="--")
        lo, hi = ys.min() - 0.05, ref + 0.35
        ax.set_xlim(lo, hi)
        for i, y in enumerate(ys):
            if y > hi:
                ax.text(hi, i, f"{y:.2f} ", ha="right", va="center", fontsize=7, color="white")
        ax.set_title(f"{domain}: bits per byte (lower is better)", fontsize=10)
        if not gapped:
            continue
        ax = axes[1, col]
        gs = np.array([100 * by[(m, domain)]["gap_closed"] for m in gapped])
        x = np.arange(len(gapped))
        ax.barh(x, gs, xerr=[100 * by[(m, domain)]["gap_closed_std"] for m in gapped],
                color=[colours[by[(m, domain)]["kind"]] for m in gapped])
        ax.set_yticks(x, gapped if col == 0 else [""] * len(gapped), fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        lo, hi = max(gs.min() - 5, -60), max(gs.max() + 5, 10)
        ax.set_xlim(lo, hi)
        for i, g in enumerate(gs):
            if g < lo:
                ax.text(lo, i, f" {g:.0f} %", ha="left", va="center", fontsize=7, color="white")
        ax.set_title(f"{domain}: gap closed, % (CLM only 0, best source 100)", fontsize=10)
    shown = [m for m in ("clm", "mince-lambda0.9", "mince-lambda0.5", "mince-lambda0.0", "avgce", "mince-sampled",
                         *[f"distill-{d}" for d in DOMAINS]) if m in curves]
    for col, key in enumerate(("clm", "fusion")):
        ax = axes[2, col]
        for m in shown:
            ys = np.array(curves[m][key])
            if key == "fusion" and not ys.any():
                continue
            window = max(1, len(ys) // 20)
            smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, label=m, lw=1.2,
                    ls=":" if m.startswith("distill") else "-")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats per target token")
        ax.set_title({"clm": "training: CLM loss on the batch (the text)",
                      "fusion": "training: fusion loss on the batch (against the teacher)"}[key], fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[2, 2]
    one = sorted((m for m in gapped if by[(m, "mean")]["models_per_token"] == 1),
                 key=lambda m: -by[(m, "mean")]["gap_closed"])
    for m in gapped:  # names for the best four at one model per token (the rest crowd there), all costlier ones
        r = by[(m, "mean")]
        ax.scatter(r["models_per_token"], 100 * r["gap_closed"], color=colours[r["kind"]], s=18)
        if m in one[:4] or r["models_per_token"] > 1:
            ax.annotate(m, (r["models_per_token"], 100 * r["gap_closed"]), fontsize=7, xytext=(4, 0),
                        textcoords="offset points")
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel("models run per predicted token")
    ax.set_ylabel("mean gap closed, %")
    ax.set_title("gap closed against inference cost", fontsize=10)
    axes[2, 3].axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=70, metadata={"Software": None})
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------
def mix_texts(spec: dict) -> list[str]:
    """The continual-training mix as the split stage cut it into blocks."""
    from fusion.stages import split

    run = make_run(spec)
    return [t for i in range(split.shard_count(run, "train")) for t in split.read_blocks(run, "train", i)[0]]


def teacher_tokens(texts: list[str], tokenizers: dict) -> dict[str, int]:
    """Per model: the tokens of one forward pass over the mix (BOS included), what capturing its
    distributions costs."""
    return {name: sum(len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"])
            for name, tok in tokenizers.items()}


def method_costs(method: str, timings: list[dict], logs: list[list[dict]], capture: dict[str, int]) -> dict:
    """A trained method's costs per seed: continual training's wall time and target tokens, and the
    forward tokens of the teachers it fuses (shared by every method that fuses them)."""
    import numpy as np

    overrides = METHODS[method][1]
    fused = [] if overrides.get("train.lambda") == 1.0 else overrides.get("fuse.sources", SOURCES + EXPERTS)
    return {"train_wall_s": round(float(np.mean([t["fuse"] + t["train"] for t in timings])), 1),
            "train_tokens": int(np.mean([sum(e["tokens"] for e in log) for log in logs])),
            "teacher_tokens": sum(capture[n] for n in fused)}


def parse_scale(base: Scale, items: list[str]) -> Scale:
    """`--scale FIELD=VALUE` changes to a Scale (for pilots: use a fresh --out)."""
    fields = {f.name: f for f in dataclasses.fields(Scale)}
    changes = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--scale {item}: unknown field (fields: {', '.join(fields)})")
        value = json.loads(raw)
        changes[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "replicate"), help="work folder: data, models, stores")
    parser.add_argument("--report", default=str(REPO / "bench" / "results"), help="where the report files go")
    parser.add_argument("--quick", action="store_true", help="a smoke run at a tiny scale (work folder <out>-quick)")
    parser.add_argument("--methods", help="comma-separated trained methods to run (default: all; clm always runs)")
    parser.add_argument("--scale", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one Scale field (JSON value), e.g. train_epochs=2; the report is then "
                             "replication-custom.*; use a fresh --out")
    args = parser.parse_args(argv)
    if not ASSETS.is_dir():
        print(f"replicate: {ASSETS} is not present; this experiment needs the shared assets", file=sys.stderr)
        return 2
    methods = list(METHODS)
    if args.methods:
        methods = ["clm", *[m.strip() for m in args.methods.split(",") if m.strip() != "clm"]]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if not sampled_capture_exists() and any(METHODS[m][0] == "sampled" for m in methods):
        print("replicate: note: this checkout's LogitsSpec has no `method` field (logits.method: sampled), so "
              f"{', '.join(m for m in methods if METHODS[m][0] == 'sampled')} is skipped", flush=True)
        methods = [m for m in methods if METHODS[m][0] != "sampled"]
    scale = parse_scale(QUICK if args.quick else Scale(), args.scale)
    out = Path(args.out + ("-quick" if args.quick else "")).resolve()
    os.environ["FUSION_CACHE_DIR"] = str(out / "cache")  # derived models (the up-scaled target) stay in the work folder
    report_dir = Path(args.report)
    stem = ("replication-quick" if args.quick else "replication") + ("-custom" if args.scale else "") + (
        "-subset" if args.methods else "")  # a subset or another scale never replaces the whole
    started, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
    phases: dict[str, dict] = {}

    @contextmanager
    def phase(name: str):
        """Wall and CPU seconds (this process and its children) of a phase of the run."""
        wall0, cpu_0 = time.perf_counter(), cpu_seconds()
        yield
        phases[name] = {"wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(cpu_seconds() - cpu_0, 1),
                        "load_average_end": round(os.getloadavg()[0], 2)}
        log(f"{name}: {phases[name]['wall_s']:.0f} s wall, {phases[name]['cpu_s']:.0f} s CPU")

    import torch

    log(f"scale {asdict(scale)}; torch threads {torch.get_num_threads()}; load {load0[0]:.1f}; work folder {out}")
    with phase("data"):
        data = prepare_data(scale)
        (out / "data").mkdir(parents=True, exist_ok=True)
        with open(out / "data" / "mix.jsonl", "w") as f:
            for domain in DOMAINS:
                for text in data[domain]["mix"]:
                    f.write(json.dumps({"text": text, "domain": domain}) + "\n")

    with phase("pretraining"):
        models = {name: build_model(name, scale, data, out / "models") for name in RECIPES}

    spec = base_spec(scale, out, models)
    tokenizers = make_run(spec).tokenizers
    with phase("upstream: split, vocab, logits, align (default and the variants' own)"):
        upstream(spec, scale, out, tokenizers, {METHODS[m][0] for m in methods})
    mix = mix_texts(spec)
    capture = teacher_tokens(mix, tokenizers)

    blocks = heldout_blocks(data, scale, list(tokenizers.values()))
    cache = out / "eval-cache"
    values: dict[str, list[dict]] = {}
    costs: dict[str, dict] = {}
    train_logs: dict[str, list[list[dict]]] = {}
    with phase("continual training (fuse, train) and evaluation"):
        for method in methods:
            seeds = scale.seeds if method not in VARIANTS else scale.seeds[: scale.variant_seeds]
            timings, scoring = [], []
            for seed in seeds:
                t = time.perf_counter()
                folder, timing = train_variant(spec, scale, out, method, seed, tokenizers)
                timings.append(timing)
                train_logs.setdefault(method, []).append(json.loads((folder / "train_log.json").read_text()))
                scores, seconds = evaluate([folder], blocks, scale, cache)
                values.setdefault(method, []).append(scores)
                scoring.append(seconds)
                shown = ", ".join(f"{d} {v:.4f}" for d, v in values[method][-1].items())
                log(f"{method} seed {seed}: {shown} ({time.perf_counter() - t:.0f} s)")
            costs[method] = {**method_costs(method, timings, train_logs[method], capture),
                             "eval_wall_s": round(sum(scoring) / len(scoring), 1)}

    with phase("baselines: models alone, merges, ensembles"):
        def baseline(method: str, folders: list[Path], built: list[Path] = ()) -> None:
            """Score a method that needs no continual training; its training cost is that of
            the models it is built from (pretraining, or for a mixture its router training)."""
            scores, seconds = evaluate(folders, blocks, scale, cache)
            values[method] = [scores]
            builds = [json.loads((f / "build.json").read_text()) for f in built if (f / "build.json").exists()]
            costs[method] = {"eval_wall_s": seconds,
                             **({"build_wall_s": round(sum(b["wall_s"] for b in builds), 1),
                                 "build_tokens": sum(b["tokens"] for b in builds)} if builds else {})}

        for name in ["target", *SOURCES, *EXPERTS]:
            baseline(name, [models[name]], [models[name]])
        for method, folder in merges(models, out).items():
            baseline(method, [folder], [models[n] for n in EXPERTS])
        for method, folder in mixtures(models, data, scale, out).items():
            baseline(method, [folder], [models[n] for n in EXPERTS])
        upscaled = make_run(with_overrides(spec, upstream_overrides("upscale", scale)), tokenizers).target
        from fusion.models import model_dir

        baseline("target-upscaled", [model_dir(upscaled)])
        baseline("ensemble-experts", [models[n] for n in EXPERTS], [models[n] for n in EXPERTS])
        order = ["src-docs", "src-sotu", "src-code"]  # the base first: Llama-2 tokens, like the target's family
        baseline("ensemble-sources", [models[n] for n in order], [models[n] for n in order])

    recs = records(values, costs)
    curves = learning_curves(train_logs)
    wall, cpu, load1 = time.perf_counter() - started, cpu_seconds() - cpu0, os.getloadavg()
    heldout_bytes = {d: sum(len(b.encode("utf-8")) for b in blocks[d]) for d in DOMAINS}
    report = {
        "experiment": "FuseLLM replication on 2 CPU cores; see bench/REPLICATION.md",
        "command": "python bench/replicate.py" + (" --quick" if args.quick else "")
                   + (f" --methods {args.methods}" if args.methods else "")
                   + "".join(f" --scale {item}" for item in args.scale),
        "scale": asdict(scale),
        "lambda": LAMBDA,
        "models": {n: {"architecture": r.architecture, "tokenizer": r.tokenizer, "trained_on": list(r.domains),
                       "init": r.init, "steps": getattr(scale, r.steps)} for n, r in RECIPES.items()},
        "methods": {m: {"upstream": w, "overrides": o, "seeds": len(values[m])}
                    for m, (w, o) in METHODS.items() if m in values},
        "skipped": [m for m in (args.methods.split(",") if args.methods else METHODS) if m.strip() not in methods],
        "data": {"mix_pieces": {d: len(data[d]["mix"]) for d in DOMAINS}, "mix_blocks": len(mix),
                 "mix_tokens": capture, "heldout_blocks": {d: len(b) for d, b in blocks.items()},
                 "heldout_bytes": heldout_bytes, "python": sys.version.split()[0]},
        "timing": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "load_average_start": [round(x, 2) for x in load0],
                   "load_average_end": [round(x, 2) for x in load1], "phases": phases,
                   "note": "a rerun skips models, stores and evaluations that exist and reports their first "
                           "computation's times per method; time a fresh --out"},
        "results": recs,
        "curves": curves,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (report_dir / f"{stem}.md").write_text(table(recs) + "\n")
    plot(recs, curves, report_dir / f"{stem}.png",
         f"FuseLLM on 2 CPU cores: held-out bits per byte and gap closed, mean ± std over {len(scale.seeds)} seeds "
         f"(dashed: CLM only)")
    print(table(recs))
    log(f"done in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, load average {load0[0]:.1f} -> {load1[0]:.1f}; "
        f"report in {report_dir / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
