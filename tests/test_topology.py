"""The pipeline object, its one shard loop and the choices resolved once: the topology comes
from one place, hashing reads files only, and every launcher runs the same `run_part`."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fusion import shards
from fusion.config import AlignSpec, TrainSpec, parse_spec
from fusion.errors import FusionError
from fusion.launch import AllShards, OneShard, Part, run_part
from fusion.pipeline import STAGES, attach, open_run
from fusion.run import RUN_RECORD, Run
from fusion.status import status

REPO = Path(__file__).resolve().parents[1]
LAYERS = REPO.parent / "shared" / "hooks" / "layers.py"


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every module of the fusion package under `root` -> the fusion modules it imports,
    wherever the import stands (one inside a function, a lazy import, is an edge too)."""
    paths = {}
    for path in (root / "fusion").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
                targets = [base.strip(".")] + [f"{base.strip('.')}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in paths:  # `from fusion.x import name`: the module fusion.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def reachable(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        out[start] = seen
    return out


def import_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module."""
    reach = reachable(graph)
    return {frozenset(o for o in reach[m] if m in reach[o]) for m in graph if m in reach[m]}


def test_no_import_cycle_anywhere_in_the_package():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}  # the check can fail
    graph = import_graph(REPO)
    assert "fusion.tiny" in graph["fusion.corpus"]  # a lazy import (inside a function) is an edge
    assert "fusion.errors" in graph["fusion.align.modes"]  # so is a relative one
    assert not import_cycles(graph), sorted(sorted(c) for c in import_cycles(graph))
    reach = reachable(graph)
    algorithms = ["scoring", "fusing", "loss", "sparse", "encoding", "corpus", "align", "models", "tiny", "upscale",
                  "ensemble", "vote", "merge", "moe", "harness"]  # README.md, "Reading the code": they know no store
    for algorithm in algorithms:
        assert not reach[f"fusion.{algorithm}"] & {"fusion.store", "fusion.shards", "fusion.run"}, algorithm


@pytest.mark.skipif(not LAYERS.exists(), reason="the shared import checker is not here")
def test_no_import_cycle_and_algorithms_reach_no_store():
    done = subprocess.run([sys.executable, str(LAYERS), str(REPO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 import cycles" in done.stdout


def test_hashing_never_builds_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path / "cache"))
    spec = {
        "name": "unbuilt",
        "store": str(tmp_path / "store"),
        "models": {"target": {"name": "t", "path": "tiny:target"}, "sources": [{"name": "s", "path": "tiny:src-neox"}]},
        "corpus": {"path": "tiny:python-stdlib"},
    }
    run = attach(Run(parse_spec(spec)), build_models=False)
    with pytest.raises(FusionError, match="tiny:src-neox is not built yet"):
        run.hash("vocab", "s")
    assert not (tmp_path / "cache").exists()  # nothing was trained or written while hashing


def test_a_run_without_pipeline_says_how_to_get_one(micro, tmp_path):
    with pytest.raises(FusionError, match="open_run"):
        Run(parse_spec(micro.spec(tmp_path / "store"))).hash("split", "train")


def test_status_lists_what_run_json_records(micro, tmp_path):
    run = open_run(parse_spec(micro.spec(tmp_path / "store")))
    run.pipeline.prepare()
    rows = status(run.store)["parts"]
    outputs = run.store.read_json(RUN_RECORD)["outputs"]
    assert [f"{r['stage']}/{r['part']}" for r in rows] == list(run.pipeline.outputs())
    assert {f"{r['stage']}/{r['part']}": r["total"] for r in rows} == {k: o["shards"] for k, o in outputs.items()}
    assert list(dict.fromkeys(r["stage"] for r in rows)) == list(STAGES)


def test_status_reaches_s3_through_the_spec_store_options(micro, s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint is only in the spec
    spec = micro.spec(f"s3://{s3_bucket}/run")
    spec["store_options"] = {"endpoint_url": s3_endpoint, "region": "us-east-1"}
    run = open_run(parse_spec(spec))
    run.pipeline.write_record()
    report = status(run.store)
    assert report["store"] == f"s3://{s3_bucket}/run" and len(report["parts"]) == len(run.pipeline.outputs())


def test_status_of_a_url_reaches_the_store_through_the_recorded_spec(micro, tmp_path):
    from fusion.status import recorded_run

    options = {"outage_seconds": 7.0, "max_attempts": 3}
    run = open_run(parse_spec(micro.spec(tmp_path / "store", store_options=options)))
    run.pipeline.write_record()
    found, record = recorded_run(str(tmp_path / "store"))
    assert found.store.url == run.store.url and found.store.outage_seconds == 7.0  # not the default 1800
    assert record["outputs"] == run.store.read_json(RUN_RECORD)["outputs"]
    assert recorded_run(run.store)[0].store is run.store  # an open Store is used as it is
    assert status(str(tmp_path / "store"))["store"] == run.store.url


def test_one_shard_commits_no_part_and_all_shards_do(micro, tmp_path):
    run = open_run(parse_spec(micro.spec(tmp_path / "store", **{"split.shard_blocks": 8})))
    n = run.pipeline.shard_count("split", "train")  # from the plan, made on first need
    assert n > 1 and not run.store.exists(RUN_RECORD)
    assert run_part(run, "split", "train", OneShard(1)) == {"computed": 1, "committed": 1}
    assert run.pipeline.prepared and run.store.exists(RUN_RECORD)  # a stage with a plan prepares the run first
    assert Part(run, "split", "heldout").is_done(1)  # one task writes both parts of its shard
    assert not shards.is_part_committed(run.store, "split", "train", run.hash("split", "train"))
    assert run_part(run, "split", "train", OneShard(1))["computed"] == 0  # done already: skipped
    assert run_part(run, "split", "train", AllShards())["computed"] == n - 1
    assert shards.is_part_committed(run.store, "split", "train", run.hash("split", "train"))
    assert run_part(run, "split", "heldout", AllShards())["computed"] == 0  # its shards came with train's
    assert shards.is_part_committed(run.store, "split", "heldout", run.hash("split", "heldout"))


def test_unknown_stages_and_parts_are_named(micro, tmp_path):
    run = open_run(parse_spec(micro.spec(tmp_path / "store")))
    with pytest.raises(FusionError, match="unknown stage 'alig'"):
        run_part(run, "alig", "src-llama", AllShards())
    with pytest.raises(FusionError, match="stage align has no part 'target'"):
        run.pipeline.check_parts("align", ["target"])


def test_every_mode_and_engine_of_the_spec_is_resolved():
    from fusion.align import MODES, resolve
    from fusion.training.engine import ENGINES

    assert set(MODES) == set(typing.get_args(AlignSpec.model_fields["mode"].annotation))
    assert set(ENGINES) == set(typing.get_args(TrainSpec.model_fields["engine"].annotation))
    assert resolve("reference-soft") is MODES["reference-soft"] and resolve(MODES["default"]) is MODES["default"]
    with pytest.raises(FusionError, match="mode 'soft' is not one of default, reference-hard, reference-soft"):
        resolve("soft")


def test_the_model_card_names_a_teacher_only_where_there_is_one():
    from fusion.stages.train import teacher_line

    assert teacher_line("mince", "sequence", "`a` 60%").startswith("Teacher taken from")
    for function, level in [("avgce", "sequence"), ("mince", "token"), ("avgce", "token")]:
        line = teacher_line(function, level, "`a` 60%")
        assert "Teacher taken from" not in line and "no block has a single teacher" in line


def test_the_fixture_command_takes_the_spec_mode_names(tmp_path, capsys):
    from fusion.cli import main

    for mode in ("reference-hard", "reference-soft", "hard", "soft"):
        assert main(["align-fixture", "--fixture", str(tmp_path / "none"), "--mode", mode, "--out", str(tmp_path / "x.npz")]) == 3
        assert "not a readable alignment fixture" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["align-fixture", "--fixture", str(tmp_path / "none"), "--mode", "default"])
    assert refused.value.code == 2
    assert "mode 'default' is not one of reference-hard, reference-soft, hard, soft" in capsys.readouterr().err


def test_fixture_mode_names_resolve_to_the_reference_modes():
    from fusion.align.modes import HARD, SOFT, resolve_reference

    assert resolve_reference("hard") is HARD and resolve_reference("reference-hard") is HARD
    assert resolve_reference("soft") is SOFT and resolve_reference(SOFT) is SOFT
    with pytest.raises(FusionError, match="mode 'default' is not one of reference-hard"):
        resolve_reference("default")
