"""The `fusion` command: the same entry for a whole local run and for one Kubernetes task."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fusion.errors import BAD_INPUT_EXIT_CODE, FusionError


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

    p = sub.add_parser("status", help="shards, tokens and bytes committed per stage and part")
    p.add_argument("store", help="run store URL")
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
    except FusionError as e:
        print(f"fusion: error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
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
    "status": cmd_status,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "align-fixture": cmd_align_fixture,
    "ensemble": cmd_ensemble,
}

if __name__ == "__main__":
    sys.exit(main())
