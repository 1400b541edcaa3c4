"""eval: bits per byte on held-out text, for the target before and after fusion and for every
source; a report (report.json, report.png) committed as `eval/report`. With eval.lm_eval.tasks,
also lm-evaluation-harness scores of the same models (lm_eval.json, fusion/harness.py),
committed as `eval/lm-eval`: a part of its own, so that neither is computed again when only
the other's settings change.

Bits per byte = total NLL of the text in bits / its UTF-8 bytes: it does not depend on the
tokenizer, so models with different vocabularies compare fairly. Every block is scored from
the model's BOS, so every byte of the text is predicted.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from fusion import harness, models, scoring, shards
from fusion.config import ModelSpec
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import Stage
from fusion.stages import align, split, train

NAME = "eval"
PART = "report"
LM_EVAL = "lm-eval"


def parts(run: Run) -> list[str]:
    return [PART, LM_EVAL] if run.spec.eval.lm_eval.tasks else [PART]


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    if part == LM_EVAL:
        return [("train", train.PART)]
    return [("split", "heldout"), ("train", train.PART)]


def fingerprint(run: Run, part: str) -> dict:
    scored = {
        "trained": run.hash("train", train.PART),
        "models": [run.model_identity(m.name) for m in run.spec.models.all()],
    }
    if part == LM_EVAL:
        settings = run.spec.eval.lm_eval
        return {**scored, "lm_eval": settings.model_dump(mode="json"), "task_files": harness.task_files_digest(settings.include_path)}
    return {**scored, "heldout": run.hash("split", "heldout"), "eval": run.spec.eval.model_dump(mode="json", exclude={"lm_eval"})}


def shard_count(run: Run, part: str) -> int:
    return 1


def heldout_blocks(run: Run) -> tuple[list[str], np.ndarray, list[str]]:
    texts, domains = [], []
    for i in range(split.shard_count(run, "heldout")):
        t, arrays = split.read_blocks(run, "heldout", i)
        texts += t
        domains.append(arrays["domain"])
    domain_names = split.plan(run)["domains"]
    domains = np.concatenate(domains) if domains else np.zeros(0, dtype=np.uint8)
    if run.spec.eval.max_blocks is not None:
        texts, domains = texts[: run.spec.eval.max_blocks], domains[: run.spec.eval.max_blocks]
    return texts, domains, domain_names


def score(run: Run, spec: ModelSpec, folder: Path | None, texts: list[str], domains: np.ndarray, names: list[str], label: str, where: str | None = None) -> dict:
    device = models.pick_device(run.spec.logits.device)
    tokenizer = run.tokenizers[spec.name]
    model = models.load_model(spec, device, path=folder)
    bos = models.context_token_id(spec, tokenizer)
    nll = scoring.block_nll(model, models.encode(tokenizer, texts), bos, run.spec.eval.batch_tokens, device, f"eval {label}")
    per_domain = {}
    for d, name in enumerate(names):
        sel = np.flatnonzero(domains == d)
        if len(sel):
            per_domain[name] = scoring.bits_per_byte(nll[sel], [texts[i] for i in sel])
    return {"model": label, "path": where or spec.path, "bits_per_byte": scoring.bits_per_byte(nll, texts), "domains": per_domain}


def scored_models(run: Run, fused: Path) -> list[tuple[str, ModelSpec, Path | None, str | None]]:
    """What the eval stage scores, in report order: (label, spec, folder if not the spec's own,
    where the report says it lies if not at the spec's path)."""
    where = shards.files_path(train.NAME, train.PART, 0)  # relative to the run store
    return [
        (f"{run.target.name} (before)", run.target, None, None),
        (f"{run.target.name} (fused)", run.target, fused, where),
        *((s.name, s, None, None) for s in run.sources),
    ]


def run_shard(run: Run, part: str, index: int) -> None:
    if part == LM_EVAL:
        run_lm_eval(run)
    else:
        run_report(run)


def run_report(run: Run) -> None:
    texts, domains, names = heldout_blocks(run)
    if not texts:
        raise FusionError("eval: no held-out text (raise corpus.heldout_fraction or add documents)")
    with tempfile.TemporaryDirectory() as tmp:
        fused = train.model_folder(run, Path(tmp) / "model")
        results = [
            score(run, spec, folder, texts, domains, names, label, where)
            for label, spec, folder, where in scored_models(run, fused)
        ]
        log = json.loads((fused / "train_log.json").read_text())
        report = {
            "run": run.spec.name,
            "heldout": {"blocks": len(texts), "bytes": int(sum(len(t.encode("utf-8")) for t in texts))},
            "method": {
                "align": run.spec.align.mode,
                "fuse": run.spec.fuse.model_dump(mode="json"),
                "lambda": run.spec.train.lam,
            },
            "results": _rounded(results),
            "training": {"steps": len(log), "first": log[0] if log else None, "last": log[-1] if log else None},
            "coverage": coverage(run),
        }
        out = Path(tmp) / "report"
        out.mkdir()
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, log, out / "report.png")
        shards.write_files_shard(run.store, NAME, PART, 0, out, run.hash(NAME, PART))


def run_lm_eval(run: Run) -> None:
    """lm-eval's scores of every scored model, committed as lm_eval.json."""
    settings = run.spec.eval.lm_eval
    harness.check(settings)
    device = models.pick_device(run.spec.logits.device)
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        fused = train.model_folder(run, Path(tmp) / "model")
        for i, (label, spec, folder, where) in enumerate(scored_models(run, fused)):
            model = models.load_model(spec, device, path=folder)
            tokenizer = run.tokenizers[spec.name]
            tokenizer = harness.with_context_token(tokenizer, models.context_token_id(spec, tokenizer), Path(tmp) / f"tokenizer-{i}")
            print(f"[fusion] eval: lm-eval {', '.join(settings.tasks)} on {label}", flush=True)
            results.append({"model": label, "path": where or spec.path, **harness.evaluate(model, tokenizer, settings)})
            del model  # one model in memory at a time
        out = Path(tmp) / LM_EVAL
        out.mkdir()
        scores = {"run": run.spec.name, "lm_eval": harness.version(), "settings": settings.model_dump(mode="json"), "results": results}
        (out / "lm_eval.json").write_text(json.dumps(scores, indent=1) + "\n")
        shards.write_files_shard(run.store, NAME, LM_EVAL, 0, out, run.hash(NAME, LM_EVAL))


def coverage(run: Run) -> dict:
    """Share of target rows that received each source's distribution."""
    out = {}
    for s in run.sources:
        rows = covered = 0
        for i in range(align.shard_count(run, s.name)):
            record = shards.read_record(run.store, "align", s.name, i)
            rows += record["rows"]
            covered += record["attrs"]["coverage"] * record["rows"]
        out[s.name] = round(covered / rows, 6) if rows else None
    return out


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def plot(report: dict, log: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report, log)
    fig.savefig(path, dpi=100, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` steps (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def figure(report: dict, log: list[dict]):
    """report.png: held-out bits per byte per model (overall, and per domain if there are
    several), and the training loss, raw (faint) and smoothed. Legends sit below the plots,
    never over a bar or a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    domains = sorted({d for r in results for d in r["domains"]})
    groups = ["all", *domains] if len(domains) > 1 else [f"all ({domains[0]})" if domains else "all"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        values = [r["bits_per_byte"]] + ([r["domains"].get(d, np.nan) for d in domains] if len(domains) > 1 else [])
        bars = ax.bar(np.arange(len(groups)) + i * width, values, width, label=r["model"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(groups)) + width * (len(results) - 1) / 2, groups)
    ax.set_ylabel("bits per byte (held out, lower is better)")
    ax.set_title(f"{report['run']}: held-out bits per byte")
    ax.margins(y=0.1)
    ncol = len(results) if len(results) <= 4 else 3
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=ncol, frameon=False)
    steps = [e["step"] for e in log]
    window = max(1, len(log) // 20)
    for key, color in (("loss", "C0"), ("clm", "C1"), ("fusion", "C2")):
        raw = [e[key] for e in log]
        ax2.plot(steps, raw, color=color, alpha=0.25, linewidth=0.8)
        ax2.plot(steps, smooth(raw, window), color=color, label=f"{key} (mean of {window} steps)" if window > 1 else key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("nats per token")
    ax2.set_title("training loss (faint: every step)")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard)
