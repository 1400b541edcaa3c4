"""The `fusion` command: the same entry for a whole local run and for one Kubernetes task."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from fusion.errors import NOT_READY_EXIT_CODE, FusionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="Knowledge fusion of LLMs (FuseLLM) as a batch system.")
    parser.add_argument("--version", action="version", version=f"fusion {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage of a run spec on this machine")
    p.add_argument("spec", metavar="SPEC", help="run spec YAML (see jobs/)")
    p.add_argument("--store", metavar="URL", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. train.lr=1e-4")
    p.add_argument("--stages", metavar="STAGE,...", help="comma-separated stages to run (default: all)")
    p.add_argument("--redo", metavar="STAGE", help="delete this stage's outputs and all later ones first, then run")

    p = sub.add_parser("stage", help="run one stage part (one shard, or all pending shards) of a run")
    p.add_argument("stage", metavar="STAGE")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--part", metavar="PART", help="default: every part of the stage")
    p.add_argument("--shard", type=int, metavar="INDEX", help="shard index (default: $JOB_COMPLETION_INDEX, else every pending shard)")
    p.add_argument("--store", metavar="URL", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (repeatable)")

    p = sub.add_parser("worker", help="claim shards of one stage by lease and compute them until none are left")
    p.add_argument("stage", metavar="STAGE")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--part", action="append", metavar="PART", help="only this part (repeatable; default: every part of the stage)")
    p.add_argument("--store", metavar="URL", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (repeatable)")
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("FUSION_LEASE_SECONDS", "300")),
        metavar="SECONDS",
        help="a dead worker's shard is taken over after this long (default $FUSION_LEASE_SECONDS or 300)",
    )
    p.add_argument("--poll-seconds", type=float, default=5.0, metavar="SECONDS", help="pause between looks while others hold the last shards")
    p.add_argument("--worker-id", metavar="ID", default=os.environ.get("FUSION_WORKER_ID"), help="default $FUSION_WORKER_ID or host-pid")

    p = sub.add_parser(
        "train",
        help="the train stage; with train.engine=deepspeed outside torchrun, first start torchrun from the "
        "PyTorchJob environment (the training pods' command)",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--store", metavar="URL", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (repeatable)")

    p = sub.add_parser("prepare", help="check a run spec, its models and corpus; plan the shards; write run.json")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--store", metavar="URL", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (repeatable)")

    p = sub.add_parser("plan", help="what a run will take before any GPU work: shards, tokens, store bytes, GPU-hours per stage")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tokens", type=float, help="training-corpus size in target tokens (when corpus.path is not here)")
    p.add_argument("--documents", type=int, help="documents in the corpus (with --tokens)")
    p.add_argument("--bytes-per-token", type=float, help="text bytes per token of models whose tokenizer is not here")
    p.add_argument("--pilot", metavar="STORE", help="a pilot run's store: measured bytes per token and throughputs")
    p.add_argument("--throughput", action="append", default=[], metavar="STAGE=TOKENS_PER_S",
                   help="per GPU (logits, train, eval) or CPU core (align, fuse); repeatable")
    p.add_argument("--gpus", type=int, default=1, help="training processes (one per GPU)")
    p.add_argument("--target-params", type=float, help="the target's parameters, if its config is not here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("k8s", help="the Kubernetes side of a run (helm/fusion runs these)")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    q = k8s.add_parser("controller", help="create each stage's workload once its inputs are committed")
    q.add_argument("spec", metavar="SPEC")
    q.add_argument("--workloads", required=True, metavar="FILE", help="the chart's workloads.yaml (multi-document)")
    q.add_argument("--job", required=True, metavar="NAME", help="the controller's own Job: owner of every workload it creates")
    q.add_argument("--namespace", metavar="NAMESPACE", help="default: $POD_NAMESPACE, else the service account's namespace")
    q.add_argument("--poll-seconds", type=float, default=15.0, metavar="SECONDS", help="pause between looks at the store")
    q.add_argument("--metrics-port", type=int, default=0, metavar="PORT", help="serve Prometheus metrics on this port (0: none)")
    q = k8s.add_parser("check", help="`helm test`: the spec parses and the store is reachable and writable")
    q.add_argument("spec", metavar="SPEC")
    k8s.add_parser("schema", help="print the Helm chart's values.schema.json (a run spec plus cluster keys)")

    p = sub.add_parser("status", help="shards, tokens and bytes committed per stage and part")
    p.add_argument("store", metavar="STORE", help="run store URL (s3://: run.json is read through the AWS environment, "
                   "the rest through the store_options of the spec it records)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    p = sub.add_parser("report", help="a finished run's report: bits per byte per model and domain, and its files")
    p.add_argument("store", metavar="STORE", help="run store URL (s3:// endpoint and credentials from the AWS environment)")
    p.add_argument("--json", action="store_true", help="print report.json as stored (lm_eval.json under `lm_eval` where the run has it)")

    p = sub.add_parser("validate", help="check a run spec, its models and corpus, without running anything")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (repeatable)")

    sub.add_parser("schema", help="print the run spec's JSON schema")

    p = sub.add_parser(
        "align-fixture",
        help="run reference-mode alignment on a FuseLLM alignment fixture and check it with the fixture's own "
        "checker (exit 1 if a sequence differs)",
    )
    p.add_argument("--fixture", required=True, metavar="DIR", help="folder in the alignment-fixture format")
    p.add_argument("--mode", required=True, type=_fixture_mode, metavar="MODE",
                   help="reference-hard or reference-soft (hard, soft: the same, short)")
    p.add_argument("--out", metavar="FILE.npz", help="also keep the candidate .npz here (default: a temporary file)")
    p.add_argument("--no-check", action="store_true", help="only write the candidate (needs --out)")

    from fusion import ensemble  # light at import time: torch loads only when a command runs

    ensemble.add_cli(sub)
    from fusion import merge

    merge.add_cli(sub)
    from fusion import moe

    moe.add_cli(sub)
    from fusion import vote

    vote.add_cli(sub)
    from fusion import harness

    harness.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except FusionError as e:  # bad input, or a store unreachable past the wait (e.exit_code says which)
        print(f"fusion: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fusion: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output left (`fusion status ... | head`): stop quietly, as a tool
        # killed by SIGPIPE would; stdout goes to /dev/null so the exit flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("fusion-llm")
    except importlib.metadata.PackageNotFoundError:
        from fusion import __version__

        return __version__


def _run(spec_path: str, store: str | None, overrides: list[str]):
    from fusion.config import load_spec
    from fusion.pipeline import open_run

    return open_run(load_spec(spec_path, overrides), store)


def cmd_run(args) -> int:
    from fusion.launch_local import redo, run_all
    from fusion.pipeline import STAGES, stage
    from fusion.summary import Progress

    run = _run(args.spec, args.store, args.set)
    stages = None
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",")]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise FusionError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    if args.redo:
        if args.redo not in STAGES:
            raise FusionError(f"--redo: unknown stage {args.redo!r} (known: {', '.join(STAGES)})")
        redo(run, stage(args.redo).name)
    progress = Progress(run, [s for s in STAGES if stages is None or s in stages])
    run_all(run, stages, progress)
    print("\n".join(progress.end_lines(f"`fusion run {args.spec}` without --stages runs them")), flush=True)
    return 0


def cmd_stage(args) -> int:
    """One stage on a pod: the shard of an Indexed Job ($JOB_COMPLETION_INDEX), or every pending one."""
    from fusion.launch import AllShards, OneShard, run_part
    from fusion.pipeline import stage

    stage(args.stage)  # an unknown stage is refused before the spec's models load
    run = _run(args.spec, args.store, args.set)
    parts = run.pipeline.check_parts(args.stage, [args.part] if args.part else None)
    run.pipeline.prepare_for(args.stage)
    shard = args.shard if args.shard is not None else os.environ.get("JOB_COMPLETION_INDEX")
    if shard is not None:
        shard = shard_in_range(run, args.stage, parts, shard, "--shard" if args.shard is not None else "$JOB_COMPLETION_INDEX")
    for part in parts:
        run_part(run, args.stage, part, AllShards() if shard is None else OneShard(int(shard)))
    return 0


def shard_in_range(run, stage: str, parts: list[str], shard, where: str) -> int:
    try:
        index = int(shard)
    except ValueError:
        raise FusionError(f"{where}={shard!r}: not a shard index") from None
    for part in parts:
        n = run.pipeline.shard_count(stage, part)
        if not 0 <= index < n:
            last = f"0..{n - 1}" if n else "none"
            raise FusionError(f"{where} {index}: out of range; stage {stage} part {part} has {n} shard(s) ({last})")
    return index


def cmd_worker(args) -> int:
    from fusion.worker import InputsNotReady, run_worker

    run = _run(args.spec, args.store, args.set)
    try:
        run_worker(run, args.stage, args.part, args.worker_id, args.lease_seconds, args.poll_seconds)
    except InputsNotReady as e:
        print(f"fusion: {e}", file=sys.stderr)
        return NOT_READY_EXIT_CODE
    return 0


def cmd_train(args) -> int:
    """The train stage's pods: with train.engine=deepspeed outside torchrun, torchrun is started
    first (from the PyTorchJob's environment) and runs this command in every rank."""
    from fusion.launch import OneShard, Part, run_part
    from fusion.stages import train
    from fusion.training import distributed, engine

    run = _run(args.spec, args.store, args.set)
    if Part(run, train.NAME, train.PART).is_done(0):
        return 0
    if engine.engine_of(run.spec.train).multi_process and not distributed.inside_torchrun():
        worker_args = [args.spec, *(["--store", args.store] if args.store else []), *(f"--set={s}" for s in args.set)]
        return distributed.launch(worker_args)
    run_part(run, train.NAME, train.PART, OneShard(0))
    return 0


def cmd_prepare(args) -> int:
    from fusion.launch_local import prepare

    run = _run(args.spec, args.store, args.set)
    prepare(run)
    plan = run.store.read_json("split/_plan.json")
    print(f"[fusion] prepared run '{run.spec.name}' in {run.store.url}: {len(plan['shards'])} shard(s), {plan['documents']} document(s)")
    return 0


def cmd_plan(args) -> int:
    from fusion.config import load_spec
    from fusion.plan import THROUGHPUT_STAGES, format_plan, make_plan

    throughput = {}
    for item in args.throughput:
        stage, _, value = item.partition("=")
        try:
            throughput[stage] = float(value)
        except ValueError:
            raise FusionError(f"--throughput {item!r}: expected STAGE=TOKENS_PER_S, e.g. train=2200") from None
        if stage not in THROUGHPUT_STAGES or throughput[stage] <= 0:
            raise FusionError(f"--throughput {item!r}: stage one of {', '.join(THROUGHPUT_STAGES)}, a positive rate")
    spec = load_spec(args.spec, args.set)
    plan = make_plan(
        spec, tokens=args.tokens, documents=args.documents, bytes_per_token=args.bytes_per_token, pilot=args.pilot,
        throughput=throughput, gpus=args.gpus, target_params=args.target_params,
    )
    print(json.dumps(plan.as_json(), indent=1) if args.json else format_plan(plan))
    return 0


def cmd_k8s(args) -> int:
    if args.k8s_command == "controller":
        from fusion.k8s import controller

        return controller.main(args.spec, args.workloads, args.job, args.namespace, args.poll_seconds, args.metrics_port)
    if args.k8s_command == "check":
        from fusion.k8s import check

        return check.main(args.spec)
    from fusion.k8s.values import schema_text

    print(schema_text(), end="")
    return 0


def cmd_status(args) -> int:
    from fusion.status import format_status, status

    report = status(args.store)
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return 0


def cmd_report(args) -> int:
    from fusion import report

    found, uris = report.load(args.store)
    print(json.dumps(found, indent=1) if args.json else report.format_report(found, uris))
    return 0


def cmd_validate(args) -> int:
    from fusion.config import load_spec
    from fusion.pipeline import open_run

    run = open_run(load_spec(args.spec, args.set))
    run.preflight()
    print(f"{args.spec}: valid ({len(run.sources)} source(s), target {run.target.name})")
    return 0


def cmd_schema(args) -> int:
    from fusion.config import RunSpec

    print(json.dumps(RunSpec.model_json_schema(by_alias=True), indent=1))
    return 0


def _fixture_mode(name: str):
    from fusion.align.fixture import mode_argument  # on use: the alignment kernels load only for this command

    return mode_argument(name)


def cmd_align_fixture(args) -> int:
    import tempfile
    from pathlib import Path

    from fusion.align.fixture import align_fixture, check_candidate

    if args.no_check and not args.out:
        raise FusionError("align-fixture: --no-check only writes the candidate, so it needs --out FILE.npz")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / f"{args.mode.fixture_name}.npz"
        result = align_fixture(args.fixture, args.mode, out)
        if not args.out:
            result["out"] = None
        if args.no_check:
            print(json.dumps(result))
            return 0
        check = check_candidate(args.fixture, args.mode, out)
    result["check"] = f"{check['passed']} passed, {check['failed']} failed"
    for line in check["failures"][:10]:
        print(f"fusion: align-fixture: {line}", file=sys.stderr)
    print(json.dumps(result))
    return 1 if check["failed"] else 0


def cmd_ensemble(args) -> int:
    from fusion.ensemble import run_cli

    return run_cli(args)


def cmd_merge(args) -> int:
    from fusion.merge import run_cli

    return run_cli(args)


def cmd_moe(args) -> int:
    from fusion.moe import run_cli

    return run_cli(args)


def cmd_vote(args) -> int:
    from fusion.vote import run_cli

    return run_cli(args)


def cmd_lm_eval(args) -> int:
    from fusion.harness import run_cli

    return run_cli(args)


COMMANDS = {
    "run": cmd_run,
    "stage": cmd_stage,
    "worker": cmd_worker,
    "train": cmd_train,
    "prepare": cmd_prepare,
    "plan": cmd_plan,
    "k8s": cmd_k8s,
    "status": cmd_status,
    "report": cmd_report,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "align-fixture": cmd_align_fixture,
    "ensemble": cmd_ensemble,
    "merge": cmd_merge,
    "moe": cmd_moe,
    "vote": cmd_vote,
    "lm-eval": cmd_lm_eval,
}

if __name__ == "__main__":
    sys.exit(main())
