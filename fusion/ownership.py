"""One owner per store: run.json says which run the store prefix belongs to.

    run.json  {"owner": {"run": "tiny", "run_id": "local", "spec_hash": "3f2a..."}, "spec": ..., "outputs": ...}

The owner (Run.owner) is the run's name, its run id and its spec hash. The run id is
$FUSION_RUN_ID, else "local"; on Kubernetes the chart sets it to NAMESPACE/RELEASE, so two
releases of the same name in two namespaces are two runs.
The spec hash covers the whole spec except how the store is reached (`store`,
`store_options`): two routes to the same store are the same run.

The first process of a run creates run.json exclusively (create-if-absent, `write`) once its
plans are made; every process first compares (`claim`, `check`), before any work:
- another run id: refused, naming both runs. Another install (release) never writes here.
- the same run id and spec hash: the same run (two `fusion run` at once, a restarted pod, a
  resumed install); they cooperate through the commit protocol.
- the same run id, another spec hash: the spec changed. If no stage output's config hash
  changes (say train.keep_checkpoints), the new spec is adopted. Otherwise it is refused,
  naming the outputs it would change, unless it is `fusion run --redo STAGE` whose STAGE is at
  or before the first changed stage: then the outputs from STAGE on are deleted and the new
  spec adopted. On Kubernetes that refusal is what a `helm upgrade` that changes the run spec
  mid-run meets, in every pod that starts after it: nothing runs half-upgraded.
"""

from __future__ import annotations

from fusion.errors import FusionError
from fusion.run import LOCAL_RUN_ID, RUN_RECORD, Run


def describe(o: dict) -> str:
    where = "run locally" if o.get("run_id") == LOCAL_RUN_ID else f"release {o.get('run_id')}"
    return f"run '{o.get('run')}' ({where}, spec hash {o.get('spec_hash')})"


def claim(run: Run, redo: str | None = None) -> None:
    """Make sure this run owns its store, before any work (see the module docstring). `redo`
    is the stage a `--redo` will compute again, from which on changed outputs are allowed."""
    mine = run.owner()
    record = run.store.read_json(RUN_RECORD) or {}
    theirs = record.get("owner")
    if theirs is None:  # a fresh store (write_record creates run.json), or one of a version before owners
        return
    refuse_other_run(run, theirs, mine)
    if theirs.get("spec_hash") == mine["spec_hash"]:
        return
    changed = changed_outputs(run, record.get("outputs") or {})
    if not changed:
        return  # a change that no output depends on: write_record adopts the new spec
    first = _first_stage(run, changed)
    if redo is not None and _order(run, redo) <= _order(run, first):
        return
    where = run.store.uri(RUN_RECORD)
    if mine["run_id"] != LOCAL_RUN_ID:
        raise FusionError(
            f"{where}: the run spec of release {mine['run_id']} changed mid-run (spec hash {theirs.get('spec_hash')} -> "
            f"{mine['spec_hash']}; it changes the config hash of {_some(changed)}): refused, nothing was started with it. "
            "Restore the previous values, or install the changed run under another store prefix"
        )
    if redo is not None:
        raise FusionError(
            f"{where}: --redo {redo} keeps {_some([o for o in changed if _order(run, o) < _order(run, redo)])}, whose settings "
            f"changed: run with --redo {first}"
        )
    raise FusionError(
        f"{where} holds {describe(theirs)}; this spec (hash {mine['spec_hash']}) changes the config hash of "
        f"{_some(changed)}: run with --redo {first} to compute them again, or use another store"
    )


def write(run: Run, record: dict) -> None:
    """Write run.json: created exclusively by the first process; any later one writes it only
    after `claim` found the store to be this run's."""
    from fusion.store import json_bytes

    if not run.store.create(RUN_RECORD, json_bytes(record)):
        claim(run)  # another process created it meanwhile: it must be this run
        run.store.write_json(RUN_RECORD, record)


def adopt(run: Run) -> None:
    """After `claim(run, redo=...)` allowed a changed spec: run.json names it from now on (its
    outputs follow once the split is planned again)."""
    run.store.write_bytes(RUN_RECORD, _initial_record(run, run.owner()))


def check(run: Run) -> None:
    """Refuse to work for a store another run owns, or under a spec other than the one its
    owner recorded (a pod started after a `helm upgrade` changed the spec). No run.json yet:
    nothing to check (the first process of the run creates it)."""
    record = run.store.read_json(RUN_RECORD)
    if not record or "owner" not in record:
        return
    mine, theirs = run.owner(), record["owner"]
    refuse_other_run(run, theirs, mine)
    if theirs.get("spec_hash") != mine["spec_hash"] and changed_outputs(run, record.get("outputs") or {}):
        raise FusionError(
            f"{run.store.uri(RUN_RECORD)} holds {describe(theirs)}, this process has spec hash {mine['spec_hash']}: "
            "the run spec changed mid-run (helm upgrade?); refused, nothing was started with it"
        )


def refuse_other_run(run: Run, theirs: dict, mine: dict) -> None:
    if theirs.get("run_id") != mine["run_id"] or theirs.get("run") != mine["run"]:
        raise FusionError(
            f"store {run.store.url} belongs to {describe(theirs)}; this is {describe(mine)}: "
            "refused before any work; give this run its own store"
        )


def changed_outputs(run: Run, recorded: dict[str, dict]) -> list[str]:
    """Stage outputs ("stage/part") whose config hash differs between run.json and this spec,
    in stage order; outputs that appear or disappear count as changed. (run.pipeline: attached
    by every caller, fusion.pipeline.attach.)"""
    pipeline = run.pipeline
    now = {f"{name}/{part}": pipeline.hash(name, part) for name in pipeline.stages for part in pipeline.parts(name)}
    if not recorded:
        return []
    order = list(pipeline.stages)
    keys = sorted(set(now) | set(recorded), key=lambda k: (order.index(k.split("/", 1)[0]), k))
    return [k for k in keys if now.get(k) != (recorded.get(k) or {}).get("config_hash")]


def _initial_record(run: Run, mine: dict) -> bytes:
    from fusion.store import json_bytes

    return json_bytes({"owner": mine, "spec": run.spec.model_dump(mode="json", by_alias=True), "store": run.store.url})


def _order(run: Run, output_or_stage: str) -> int:
    return list(run.pipeline.stages).index(output_or_stage.split("/", 1)[0])


def _first_stage(run: Run, outputs: list[str]) -> str:
    return min(outputs, key=lambda o: _order(run, o)).split("/", 1)[0]


def _some(outputs: list[str], most: int = 4) -> str:
    more = len(outputs) - most
    return ", ".join(outputs[:most]) + (f" and {more} more" if more > 0 else "")
