"""`fusion report STORE`: a run's evaluation report (eval/report) as a table in the terminal,
with where report.json and report.png lie; and, where the run has them (eval.lm_eval), the
lm-evaluation-harness scores (eval/lm-eval) as a second table. The end of `fusion run` prints
the same."""

from __future__ import annotations

import hashlib
import json

from fusion import harness, shards
from fusion.errors import FusionError
from fusion.store import Store

STAGE = "eval"  # the eval stage's outputs (fusion/stages/evaluate.py): part -> its files
FILES = {"report": ("report.json", "report.png"), "lm-eval": ("lm_eval.json",)}


def report_uris(store: Store) -> dict[str, str]:
    """File name -> URI of the report's files in the store (lm_eval.json where it is committed)."""
    uris = {}
    for part, names in FILES.items():
        if part == "report" or shards.read_record(store, STAGE, part, 0) is not None:
            folder = shards.files_path(STAGE, part, 0)
            uris.update({name: f"{store.uri(folder)}/{name}" for name in names})
    return uris


def read_committed_json(store: Store, part: str, name: str) -> dict | None:
    """A committed JSON file of the eval stage, checked against its commit record; None before
    the part commits."""
    record = shards.read_record(store, STAGE, part, 0)
    if record is None:
        return None
    rel = f"{shards.files_path(STAGE, part, 0)}/{name}"
    blob = store.read_bytes(rel)
    if blob is None or hashlib.sha256(blob).hexdigest()[:32] != record["files"].get(name):
        raise FusionError(f"{store.uri(rel)}: missing or not the committed bytes (checksum differs from its record)")
    return json.loads(blob)


def read_report(store: Store) -> dict | None:
    """report.json, with lm_eval.json under "lm_eval" where the run has it; None before eval commits."""
    report = read_committed_json(store, "report", "report.json")
    if report is not None:
        lm_eval = read_committed_json(store, "lm-eval", "lm_eval.json")
        if lm_eval is not None:
            report["lm_eval"] = lm_eval
    return report


def load(url: str) -> tuple[dict, dict[str, str]]:
    """The report of the run store at `url` and its files' URIs; a one-line error if there is none."""
    from fusion.run import RUN_RECORD

    store = Store(url)
    if store.read_json(RUN_RECORD) is None:
        raise FusionError(f"{store.uri(RUN_RECORD)} does not exist: not a fusion run store")
    report = read_report(store)
    if report is None:
        raise FusionError(
            f"{store.url}: no report yet (the eval stage has not committed); `fusion status {url}` shows how far the run is"
        )
    return report, report_uris(store)


def format_report(report: dict, uris: dict[str, str]) -> str:
    results = report["results"]
    domains = sorted({d for r in results for d in r["domains"]})
    method = report["method"]
    fuse = method["fuse"]
    held = report["heldout"]
    lines = [
        f"run {report['run']}: held-out {held['blocks']:,} blocks, {held['bytes']:,} bytes; align {method['align']}, "
        f"fuse {fuse['function']} per {fuse['level']} by {fuse['metric']}, lambda {method['lambda']}",
        "",
    ]
    width = max([len("model")] + [len(r["model"]) for r in results])
    columns = ["bits/byte", *domains] if len(domains) > 1 else ["bits/byte"]
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{c:>10}" for c in columns))
    for r in results:
        values = [r["bits_per_byte"]] + ([r["domains"].get(d) for d in domains] if len(domains) > 1 else [])
        lines.append(f"{r['model']:<{width}}  " + "  ".join("—".rjust(10) if v is None else f"{v:>10.4f}" for v in values))
    before = next((r for r in results if r["model"].endswith(" (before)")), None)
    fused = next((r for r in results if r["model"].endswith(" (fused)")), None)
    lines.append("")
    if before and fused:
        delta = fused["bits_per_byte"] - before["bits_per_byte"]
        lines.append(
            f"fused vs before: {delta:+.4f} bits/byte ({delta / before['bits_per_byte']:+.1%}); lower is better"
        )
    training = report.get("training") or {}
    first, last = training.get("first"), training.get("last")
    if first and last:
        lines.append(
            f"training: {training['steps']} steps, loss {first['loss']:.3f} -> {last['loss']:.3f} "
            f"(CLM {first['clm']:.3f} -> {last['clm']:.3f}, fusion {first['fusion']:.3f} -> {last['fusion']:.3f})"
        )
    coverage = report.get("coverage") or {}
    if coverage:
        shares = ", ".join(f"{name} {share:.1%}" if share is not None else f"{name} —" for name, share in coverage.items())
        lines.append(f"target rows with a source distribution: {shares}")
    lm_eval = report.get("lm_eval")
    if lm_eval:
        settings = lm_eval["settings"]
        limit = f", at most {settings['limit']} items per task" if settings["limit"] else ""
        lines += ["", f"lm-evaluation-harness {lm_eval['lm_eval']}{limit} (value ± standard error):"]
        lines += harness.format_table(lm_eval["results"])
        lines.append("")
    lines += [f"{name:<12} {uri}" for name, uri in uris.items()]
    return "\n".join(lines)
