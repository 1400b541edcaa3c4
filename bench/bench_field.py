"""What each way of combining models costs: the user-facing command's time and memory, and the
result's inference cost per token.

    python bench/bench_field.py     # 5 min on 2 cores; the replication's quick-scale models are built
                                    # first if absent (25 min on a loaded machine)

The models are bench/replicate.py's quick-scale ones (same work folder, runs/replicate-quick,
built by the same code if absent): the target and its three experts (Llama, 2 layers of width
128, Mistral's 32k vocabulary), and three heterogeneous sources (GPT-2, Llama-2, GPT-NeoX
tokenizers). Every command below is the one a user types, run in a fresh child process, so its
time and memory include starting Python and importing torch and transformers (the `startup`
row measures that alone); the configurations are the replication's (replicate.merge_configs,
replicate.moe_configs, the upscale store's spec).

    startup            python -c "import torch, transformers"        (baseline: fixed cost of a command)
    merge-<method>     fusion merge CONFIG OUT                       linear, ties, dare_ties, slerp
                                                                     (two pairwise merges), model_stock, sce
    moe-hidden         fusion moe CONFIG OUT                         routers from hidden states
    moe-trained        fusion moe CONFIG OUT                         the same, routers trained briefly
    upscale-target     the up-scaled target as a run builds it       (fusion.models.model_dir of a spec
                                                                     with models.target.init.upscale)
    one-expert-score   fusion ensemble score EXPERT --text HELDOUT   (baseline: one model scores the text)
    ensemble-experts   fusion ensemble score EXPERT x3 --text HELDOUT       one vocabulary, exact
    ensemble-sources   fusion ensemble score SOURCE x3 --text HELDOUT       three vocabularies, aligned
    one-expert-gen     fusion ensemble generate EXPERT --prompt P    (baseline: one model generates)
    ensemble-gen       fusion ensemble generate EXPERT x3 --prompt P
    vote-experts       fusion vote EXPERT x3 --prompt P
    vote-all           fusion vote SOURCE x3 EXPERT x3 --prompt P

Generation rows run once per prompt (one held-out prompt per domain, 64 new tokens) and add the
times up. Measured per command: wall seconds, CPU seconds (user + system: less sensitive than
wall time to other work on the machine) and the child's peak resident memory (ru_maxrss from
os.wait4). Counted, not measured: the parameters of the produced model (from its saved
safetensors) or of all members, the parameters that run per generated or scored token, and how
many models run per token.

Prints a table and, last, one JSON line; writes the JSON to bench/results/field_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vote  # noqa: E402  (bench/bench_vote.py: held-out prompts)
import replicate  # noqa: E402  (bench/replicate.py: data, models, configurations)

REPO = replicate.REPO
MAX_NEW_TOKENS = 64


# ---- counting parameters in saved models ---------------------------------------------------------
def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the headers of a model folder's safetensors files."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    return shapes


def count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameters(folder: Path) -> tuple[int, int]:
    """(parameters saved, parameters that run per token). They differ only for a mixture of
    experts: per token its router picks k of the E experts of each layer, so only k/E of the
    expert weights run."""
    shapes = safetensors_shapes(folder)
    total = sum(count(s) for s in shapes.values())
    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts")
    if not experts:
        return total, total
    expert_params = sum(count(s) for name, s in shapes.items() if ".experts." in name)
    return total, round(total - expert_params + expert_params * config["num_experts_per_tok"] / experts)


# ---- running one command in a fresh process -----------------------------------------------------
@dataclass
class Row:
    """One row of the table: the command(s) it runs, and what it makes or runs per token."""

    commands: list[list[str]]  # run one after another; times add up, memory is the largest
    product: Path | None = None  # the model folder it writes
    members: list[str] = field(default_factory=list)  # the models it runs per token (ensembles, votes)
    per_token: str = ""  # models run per token, in words
    replication: str = ""  # its rows in REPLICATION.md or vote-quick.json
    shown: str = ""  # how the table shows the command, where not the command itself


def measure(argv: list[str], env: dict, log: Path) -> dict:
    """Run `argv` as a child process; its wall and CPU seconds and peak resident memory."""
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"bench_field: {' '.join(argv[:4])} ... exited {child.returncode}; its output is in {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "replicate"),
                        help="the replication's work folder (-quick is added)")
    parser.add_argument("--report", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    if not replicate.ASSETS.is_dir():
        print(f"bench_field: {replicate.ASSETS} is not present; this benchmark needs the shared assets",
              file=sys.stderr)
        return 2

    # ---- the models, and a fresh folder for everything the commands make
    scale = replicate.QUICK
    out = Path(args.out + "-quick").resolve()
    data = replicate.prepare_data(scale)
    models = {n: replicate.build_model(n, scale, data, out / "models") for n in replicate.RECIPES}
    work = out / "field"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "FUSION_CACHE_DIR": str(work / "cache")}  # the up-scaled target is built anew
    fusion = [sys.executable, "-m", "fusion"]

    def write_yaml(name: str, data: dict) -> str:
        (work / name).write_text(yaml.safe_dump(data, sort_keys=False))
        return str(work / name)

    heldout = work / "heldout.txt"
    heldout.write_text("\n\n".join(p for d in replicate.DOMAINS for p in data[d]["heldout"]))
    prompts = [p for d in replicate.DOMAINS for p, _ in bench_vote.prompts(data, d, 1, 300, 160)]
    experts = [str(models[n]) for n in replicate.EXPERTS]
    sources = [str(models[n]) for n in ["src-docs", "src-sotu", "src-code"]]  # the base first, as the replication

    # ---- the commands, one row each
    rows = {"startup": Row([[sys.executable, "-c", "import torch, transformers"]])}
    for method, steps in replicate.merge_configs(models, work).items():
        commands = []
        for i, step in enumerate(steps):  # SLERP: two pairwise merges
            config = write_yaml(f"{method}-{i + 1}.yaml" if len(steps) > 1 else f"{method}.yaml",
                                {k: v for k, v in step.items() if k != "out"})
            commands.append([*fusion, "merge", config, step.get("out", str(work / "models" / method))])
        rows[method] = Row(commands, product=work / "models" / method, per_token="1", replication=method)
    for method, config in replicate.moe_configs(models, data, scale, out).items():
        rows[method] = Row([[*fusion, "moe", write_yaml(f"{method}.yaml", config), str(work / "models" / method)]],
                           product=work / "models" / method, per_token="attention 1, MLPs 2 of 3", replication=method)
    spec = replicate.with_overrides(replicate.base_spec(scale, out, models),
                                    replicate.upstream_overrides("upscale", scale))
    build = ("import sys; from fusion.config import load_spec; from fusion.models import model_dir; "
             "print(model_dir(load_spec(sys.argv[1]).models.target))")  # what every stage reading the target does
    rows["upscale-target"] = Row([[sys.executable, "-c", build, write_yaml("upscale-spec.yaml", spec)]],
                                 shown="model_dir(load_spec(SPEC).models.target), SPEC with models.target.init.upscale",
                                 per_token="1 (4 layers, base 2)",
                                 replication="target-upscaled, upscale-clm, upscale-mince")
    score = [*fusion, "ensemble", "score"]
    rows["one-expert-score"] = Row([[*score, experts[1], "--text", str(heldout)]], members=experts[1:2], per_token="1",
                                   replication="exp-docs")
    rows["ensemble-experts"] = Row([[*score, *experts, "--text", str(heldout)]], members=experts, per_token="3",
                                   replication="ensemble-experts")
    rows["ensemble-sources"] = Row([[*score, *sources, "--text", str(heldout)]], members=sources,
                                   per_token="3 (+ alignment)", replication="ensemble-sources")
    generate = [*fusion, "ensemble", "generate"]
    tokens = ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    rows["one-expert-gen"] = Row([[*generate, experts[1], "--prompt", p, *tokens] for p in prompts],
                                 members=experts[1:2], per_token="1", replication="exp-docs (vote-quick.json)")
    rows["ensemble-gen"] = Row([[*generate, *experts, "--prompt", p, *tokens] for p in prompts], members=experts,
                               per_token="3", replication="ensemble-experts (vote-quick.json)")
    rows["vote-experts"] = Row([[*fusion, "vote", *experts, "--prompt", p, *tokens] for p in prompts], members=experts,
                               per_token="3 (each its own text)", replication="vote-experts-* (vote-quick.json)")
    rows["vote-all"] = Row([[*fusion, "vote", *sources, *experts, "--prompt", p, *tokens] for p in prompts],
                           members=sources + experts, per_token="6 (each its own text)",
                           replication="vote-all-* (vote-quick.json)")

    def shown(row: Row) -> str:
        """The row's first command as a user types it, paths relative to the work folder."""
        command = row.commands[0]
        words = ["fusion", *command[3:]] if command[1:3] == ["-m", "fusion"] else ["python", *command[1:]]
        if "--prompt" in words:
            words[words.index("--prompt") + 1] = "P"
        text = row.shown or " ".join(f"'{w}'" if " " in w else w for w in words)
        text = text.replace(str(work) + "/", "").replace(str(out) + "/", "")
        if len(row.commands) > 1:
            more = len(row.commands)
            text += f" ({more} prompts)" if "--prompt" in words else f" (then {more - 1} more)"
        return text

    # ---- run them, one at a time
    member_params = parameters(models["exp-docs"])[0]
    load0 = os.getloadavg()
    started = time.perf_counter()
    results = []
    for name, row in rows.items():
        runs = [measure(c, env, work / "logs" / f"{name}-{i}.log") for i, c in enumerate(row.commands)]
        product = row.product
        if name == "upscale-target":  # the command prints the up-scaled folder
            product = Path((work / "logs" / f"{name}-0.log").read_text().split()[-1])
        if product is not None:
            params, active = parameters(product)
        else:  # an ensemble or a vote runs all its members
            params = active = sum(parameters(Path(m))[0] for m in row.members)
        results.append({
            "method": name, "command": shown(row), "commands": len(row.commands),
            "wall_s": round(sum(r["wall_s"] for r in runs), 1), "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)), "params": params,
            "params_per_token": active, "params_vs_member": round(params / member_params, 2) if params else None,
            "models_per_token": row.per_token, "replication_row": row.replication,
        })
        print(f"[bench_field] {name}: {results[-1]['wall_s']} s wall, {results[-1]['peak_rss_mb']} MB", flush=True)
    load1 = os.getloadavg()

    # ---- report
    print()
    print("| method | command | wall s | CPU s | peak RSS MB | params (M) | × member | params run per token (M) "
          "| models per token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        params, active = (f"{x / 1e6:.2f}" if x else "" for x in (r["params"], r["params_per_token"]))
        print(f"| {r['method']} | `{r['command']}` | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']} | "
              f"{params} | {r['params_vs_member'] or ''} | {active} | {r['models_per_token']} |")
    report = {
        "benchmark": "cost of each family's command (fresh child process) and of its result per token",
        "command": "python bench/bench_field.py",
        "date": time.strftime("%Y-%m-%d"),
        "models": "bench/replicate.py quick scale (2 layers, width 128); member = one expert, "
                  f"{member_params} parameters",
        "generation": {"prompts": len(prompts), "max_new_tokens": MAX_NEW_TOKENS},
        "heldout_bytes": len(heldout.read_bytes()),
        "machine": {"cores": os.cpu_count(), "load_average_start": [round(x, 2) for x in load0],
                    "load_average_end": [round(x, 2) for x in load1],
                    "note": "2 shared cores; wall times are indicative"},
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / "field_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
