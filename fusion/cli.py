"""The `fusion` command: the same entry for a whole local run and for one Kubernetes task."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fusion.errors import NOT_READY_EXIT_CODE, FusionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion", description="Knowledge fusion of LLMs (FuseLLM) as a batch system.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage of a run spec on this machine")
    p.add_argument("spec", help="run spec YAML (see jobs/)")
    p.add_argument("--store", help="run store URL, overriding the spec's `store`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. train.lr=1e-4")
    p.add_argument("--stages", help="comma-separated stages to run (default: all)")
    p.add_argument("--redo", metavar="STAGE", help="delete this stage's outputs and all later ones first, then run")

    p = sub.add_parser("stage", help="run one stage part (one shard, or all pending shards) of a run")
    p.add_argument("stage")
    p.add_argument("spec")
    p.add_argument("--part", help="default: every part of the stage")
    p.add_argument("--shard", type=int, help="shard index (default: $JOB_COMPLETION_INDEX, else every pending shard)")
    p.add_argument("--store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("worker", help="claim shards of one stage by lease and compute them until none are left")
    p.add_argument("stage")
    p.add_argument("spec")
    p.add_argument("--part", action="append", help="only this part (repeatable; default: every part of the stage)")
    p.add_argument("--store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("FUSION_LEASE_SECONDS", "300")),
        help="a dead worker's shard is taken over after this long (default $FUSION_LEASE_SECONDS or 300)",
    )
    p.add_argument("--poll-seconds", type=float, default=5.0, help="pause between looks while others hold the last shards")
    p.add_argument("--worker-id", default=os.environ.get("FUSION_WORKER_ID"), help="default $FUSION_WORKER_ID or host-pid")

    p = sub.add_parser(
        "train",
        help="the train stage; with train.engine=deepspeed outside torchrun, first start torchrun from the "
        "PyTorchJob environment (the training pods' command)",
    )
    p.add_argument("spec")
    p.add_argument("--store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("prepare", help="check a run spec, its models and corpus; plan the shards; write run.json")
    p.add_argument("spec")
    p.add_argument("--store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("k8s", help="the Kubernetes side of a run (helm/fusion runs these)")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    q = k8s.add_parser("controller", help="create each stage's workload once its inputs are committed")
    q.add_argument("spec")
    q.add_argument("--workloads", required=True, help="the chart's workloads.yaml (multi-document)")
    q.add_argument("--job", required=True, help="the controller's own Job: owner of every workload it creates")
    q.add_argument("--namespace", help="default: $POD_NAMESPACE, else the service account's namespace")
    q.add_argument("--poll-seconds", type=float, default=15.0)
    q = k8s.add_parser("check", help="`helm test`: the spec parses and the store is reachable and writable")
    q.add_argument("spec")
    k8s.add_parser("schema", help="print the Helm chart's values.schema.json (a run spec plus cluster keys)")

    p = sub.add_parser("status", help="shards, tokens and bytes committed per stage and part")
    p.add_argument("store", help="run store URL (s3:// endpoint and credentials from the AWS environment)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="check a run spec, its models and corpus, without running anything")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("schema", help="print the run spec's JSON schema")

    p = sub.add_parser("align-fixture", help="run reference-mode alignment on a FuseLLM alignment fixture")
    p.add_argument("--fixture", required=True)
    p.add_argument("--mode", required=True, choices=["hard", "soft"])
    p.add_argument("--out", required=True)

    from fusion import ensemble  # light at import time: torch loads only when a command runs

    ensemble.add_cli(sub)

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FusionError as e:  # bad input, or a store unreachable past the wait (e.exit_code says which)
        print(f"fusion: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fusion: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _run(spec_path: str, store: str | None, overrides: list[str]):
    from fusion.config import load_spec
    from fusion.run import Run

    return Run(load_spec(spec_path, overrides), store)


def cmd_run(args) -> int:
    from fusion.launch_local import redo, run_all, summary
    from fusion.stages import STAGES

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
        redo(run, args.redo)
    run_all(run, stages)
    print(summary(run))
    return 0


def cmd_stage(args) -> int:
    from fusion.launch_local import prepare, run_part, shard_done
    from fusion.stages import STAGES

    if args.stage not in STAGES:
        raise FusionError(f"unknown stage {args.stage!r} (known: {', '.join(STAGES)})")
    run = _run(args.spec, args.store, args.set)
    module = STAGES[args.stage]
    parts = [args.part] if args.part else module.parts(run)
    for part in parts:
        if part not in module.parts(run):
            raise FusionError(f"stage {args.stage} has no part {part!r} (parts: {', '.join(module.parts(run))})")
    if args.stage == "split":
        prepare(run)
    shard = args.shard if args.shard is not None else os.environ.get("JOB_COMPLETION_INDEX")
    for part in parts:
        if shard is None:
            run_part(run, args.stage, part)
        elif not shard_done(run, args.stage, part, int(shard)):
            module.run_shard(run, part, int(shard))
    return 0


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
    from fusion.launch_local import shard_done
    from fusion.stages import train
    from fusion.training import distributed

    run = _run(args.spec, args.store, args.set)
    if shard_done(run, train.NAME, train.PART, 0):
        return 0
    if run.spec.train.engine == "deepspeed" and not distributed.inside_torchrun():
        worker_args = [args.spec, *(["--store", args.store] if args.store else []), *(f"--set={s}" for s in args.set)]
        return distributed.launch(worker_args)
    train.run_shard(run, train.PART, 0)
    return 0


def cmd_prepare(args) -> int:
    from fusion.launch_local import prepare

    run = _run(args.spec, args.store, args.set)
    prepare(run)
    plan = run.store.read_json("split/_plan.json")
    print(f"[fusion] prepared run '{run.spec.name}' in {run.store.url}: {len(plan['shards'])} shard(s), {plan['documents']} document(s)")
    return 0


def cmd_k8s(args) -> int:
    if args.k8s_command == "controller":
        from fusion.k8s import controller

        return controller.main(args.spec, args.workloads, args.job, args.namespace, args.poll_seconds)
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


def cmd_validate(args) -> int:
    from fusion.config import load_spec
    from fusion.run import Run

    run = Run(load_spec(args.spec, args.set))
    run.preflight()
    print(f"{args.spec}: valid ({len(run.sources)} source(s), target {run.target.name})")
    return 0


def cmd_schema(args) -> int:
    from fusion.config import RunSpec

    print(json.dumps(RunSpec.model_json_schema(by_alias=True), indent=1))
    return 0


def cmd_align_fixture(args) -> int:
    from fusion.align import align_fixture

    print(json.dumps(align_fixture(args.fixture, args.mode, args.out)))
    return 0


def cmd_ensemble(args) -> int:
    from fusion.ensemble import run_cli

    return run_cli(args)


COMMANDS = {
    "run": cmd_run,
    "stage": cmd_stage,
    "worker": cmd_worker,
    "train": cmd_train,
    "prepare": cmd_prepare,
    "k8s": cmd_k8s,
    "status": cmd_status,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "align-fixture": cmd_align_fixture,
    "ensemble": cmd_ensemble,
}

if __name__ == "__main__":
    sys.exit(main())
