"""Downstream evaluation with EleutherAI's lm-evaluation-harness (the `lm-eval` package, this
project's `eval` extra), as the FuseLLM paper evaluates: BBH, common-sense multiple choice,
code. One code path for the eval stage (`eval.lm_eval` in a run spec, fusion/stages/evaluate.py)
and for `fusion lm-eval MODEL...`:

    check(settings)                       lm-eval installed, include_path a folder, every task known
    evaluate(model, tokenizer, settings)  lm-eval's scores of one loaded model
    format_table(results)                 task/metric x model, value ± stderr

Every text starts from the model's context token (BOS, else EOS), as the blocks did in
training and in bits per byte; for tokenizers that add a BOS themselves (Llama, Mistral) that
is lm-eval's default too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

from fusion import models
from fusion.config import LmEvalSpec
from fusion.errors import FusionError

INSTALL = 'pip install -c constraints.txt -e ".[eval]"'
KEYS = {"tasks": "eval.lm_eval.tasks", "include_path": "eval.lm_eval.include_path"}  # how messages name the settings


def require(who: str = KEYS["tasks"]) -> None:
    """lm-eval and what its Hugging Face backend imports (accelerate, peft: the `hf` extra)."""
    try:
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:
        if (e.name or "lm_eval").startswith("lm_eval"):
            missing = "the lm-eval package"
        else:
            missing = f"{e.name}, which lm-eval's Hugging Face backend imports,"
        raise FusionError(f"{who}: {missing} is not installed ({INSTALL})") from None


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm-eval")


@functools.cache
def task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """lm-eval's index of tasks, with the YAMLs of `include_path`. Indexing lm-eval's own
    15,000 task files takes about 10 s, so when every task is in `include_path` only that
    folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def _include_path(settings: LmEvalSpec) -> str | None:
    return None if settings.include_path is None else str(Path(settings.include_path).expanduser())


def check(settings: LmEvalSpec, keys: dict[str, str] = KEYS) -> None:
    """A one-line error naming the culprit, before any model loads: lm-eval missing, the
    include_path not a folder, a task neither lm-eval nor the include_path knows."""
    require(keys["tasks"])
    include_path = _include_path(settings)
    if include_path is not None and not Path(include_path).is_dir():
        raise FusionError(f"{keys['include_path']}: {settings.include_path} is not a folder")
    known = task_manager(include_path, tuple(settings.tasks)).all_tasks
    unknown = [t for t in settings.tasks if t not in known]
    if unknown:
        where = f"lm-eval {version()}" + (f" nor {settings.include_path}" if include_path else "")
        raise FusionError(
            f"{keys['tasks']}: unknown task(s) {', '.join(unknown)}: not in {where} (`lm-eval ls tasks` lists lm-eval's)"
        )


def task_files_digest(include_path: str | None) -> str | None:
    """A digest of every file under `include_path`: editing a local task or its data changes the
    eval stage's config hash, so its committed scores are never reused for other items."""
    if include_path is None:
        return None
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise FusionError(f"{KEYS['include_path']}: {include_path} is not a folder")
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def with_context_token(tokenizer, context_id: int, scratch: Path):
    """`tokenizer`, saved to `scratch` and loaded again so that it starts every text with
    `context_id` (fusion.models.save_tokenizer, as the fused model's folder does)."""
    from transformers import AutoTokenizer

    models.save_tokenizer(tokenizer, scratch, context_id)
    return AutoTokenizer.from_pretrained(str(scratch))


def evaluate(model, tokenizer, settings: LmEvalSpec) -> dict:
    """lm-eval's scores of one loaded causal LM: {"tasks": {task: {metric: {"value", "stderr"}}},
    "samples": {task: items scored}, "shots": {task: few-shot examples}}. Groups (bbh) come
    with their aggregate and every subtask."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(settings.tasks),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        task_manager=task_manager(_include_path(settings), tuple(settings.tasks)),
        log_samples=False,
        confirm_run_unsafe_code=settings.confirm_run_unsafe_code,
    )
    return scores(out)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def scores(out: dict) -> dict:
    """The metrics of simple_evaluate's result. lm-eval keys them "metric,filter" (filter "none"
    for most tasks) with the standard error as "metric_stderr,filter", "N/A" where it has none."""
    tasks = {}
    for task, values in out["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = {"value": _number(value), "stderr": _number(values.get(f"{metric}_stderr,{filt}"))}
        tasks[task] = metrics
    return {
        "tasks": tasks,
        "samples": {t: n["effective"] for t, n in out.get("n-samples", {}).items()},
        "shots": dict(out.get("n-shot", {})),
    }


def evaluate_folder(folder: str, settings: LmEvalSpec, device: str, dtype: str | None, scratch: Path) -> dict:
    """`evaluate` on the model and tokenizer of a Hugging Face folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise FusionError(f"{folder}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    model = models.load_folder(folder, dtype, device, who=folder)
    context_id = models.context_token_id(SimpleNamespace(name=folder), tokenizer)
    return evaluate(model, with_context_token(tokenizer, context_id, scratch), settings)


def format_table(results: list[dict]) -> list[str]:
    """Lines of a table: a row per task and metric, a column per model (`results`: one entry
    per model, {"model": label, "tasks": ..., "samples": ..., "shots": ...})."""
    rows = list(dict.fromkeys((task, metric) for r in results for task, metrics in r["tasks"].items() for metric in metrics))
    first = results[0] if results else {"samples": {}, "shots": {}}

    def cell(r, task, metric):
        score = r["tasks"].get(task, {}).get(metric)
        if score is None:
            return "—"
        return f"{score['value']:.4f}" + ("" if score["stderr"] is None else f" ± {score['stderr']:.4f}")

    def about(task):
        n, shots = first["samples"].get(task), first["shots"].get(task)
        return ", ".join(x for x in (f"{n} items" if n is not None else "", f"{shots}-shot" if shots is not None else "") if x)

    header = ["task", "items", "metric", *(r["model"] for r in results)]
    table = [[task, about(task), metric, *(cell(r, task, metric) for r in results)] for task, metric in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(row):  # the labels left-aligned, the scores right-aligned
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(header), *(line(row) for row in table)]


def add_cli(sub) -> None:
    """`fusion lm-eval MODEL...` (called by fusion/cli.py)."""
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on model folders, side by side (the eval stage's eval.lm_eval)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="Hugging Face model folders (with their tokenizers)")
    p.add_argument("--tasks", required=True, metavar="TASK,...", help="comma-separated lm-eval tasks or groups")
    p.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAMLs")
    p.add_argument("--limit", type=int, metavar="N", help="score at most N items of each task")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per item (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests per forward batch")
    p.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow tasks that execute model-written code")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the folder's)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")


def run_cli(args) -> int:
    import tempfile

    from pydantic import ValidationError

    try:
        settings = LmEvalSpec(
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], include_path=args.include_path,
            limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise FusionError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if not settings.tasks:
        raise FusionError("--tasks: no task named")
    check(settings, {"tasks": "--tasks", "include_path": "--include-path"})
    device = models.pick_device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, folder in enumerate(args.models):
            scored = evaluate_folder(folder, settings, device, args.dtype, Path(tmp) / f"tokenizer-{i}")
            results.append({"model": folder, **scored})
    if args.json:
        print(json.dumps({"lm_eval": version(), "settings": settings.model_dump(mode="json"), "results": results}, indent=1))
    else:
        print("\n".join(format_table(results)))
    return 0
