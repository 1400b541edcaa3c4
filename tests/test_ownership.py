"""One owner per store (fusion/ownership.py): run.json is created once and names the run; another
run or release is refused before any work, naming both; the same run cooperates; a changed spec
is refused unless `--redo` covers every output it changes; trainers delete only their own
checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusion.cli import main
from fusion.config import parse_spec
from fusion.errors import BAD_INPUT_EXIT_CODE
from fusion.run import RUN_RECORD
from fusion.pipeline import STAGES, open_run
from fusion.training import checkpoint
from tests.s3 import FaultyProxy, options_for, record_puts

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_run_is_refused_before_any_work(micro, tmp_path, capsys):
    store = tmp_path / "store"
    assert cli(capsys, "prepare", micro.write_spec(tmp_path / "a.yaml", store))[0] == 0
    record = json.loads((store / RUN_RECORD).read_text())
    assert record["owner"]["run"] == "micro" and record["owner"]["run_id"] == "local"
    before = files(store)
    other = micro.spec(store, **{"split.block_tokens": 48})
    other["name"] = "other"
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(other))
    code, err = cli(capsys, "run", path)
    assert code == BAD_INPUT_EXIT_CODE and "\n" not in err
    assert f"store file://{store} belongs to run 'micro' (run locally, spec hash {record['owner']['spec_hash']})" in err
    assert "this is run 'other' (run locally, spec hash " in err and "refused before any work" in err
    assert files(store) == before
    # a worker or a stage task of the other run is refused too
    assert cli(capsys, "worker", "logits", path)[0] == BAD_INPUT_EXIT_CODE
    assert cli(capsys, "stage", "vocab", path)[0] == BAD_INPUT_EXIT_CODE
    assert files(store) == before


def test_another_release_is_refused(micro, tmp_path, capsys, monkeypatch):
    """The chart sets the run id to NAMESPACE/RELEASE: another release, or one of the same name
    in another namespace, is another run."""
    store = tmp_path / "store"
    spec = micro.write_spec(tmp_path / "a.yaml", store)
    monkeypatch.setenv("FUSION_RUN_ID", "team-a/tiny")
    assert cli(capsys, "prepare", spec)[0] == 0
    assert cli(capsys, "prepare", spec)[0] == 0  # the same release again: the same run
    for other in ("team-a/other", "team-b/tiny"):
        monkeypatch.setenv("FUSION_RUN_ID", other)
        code, err = cli(capsys, "prepare", spec)
        assert code == BAD_INPUT_EXIT_CODE
        assert "belongs to run 'micro' (release team-a/tiny, " in err and f"this is run 'micro' (release {other}, " in err


def test_a_changed_spec_needs_a_redo_that_covers_it(micro, tmp_path, capsys):
    store = tmp_path / "store"
    assert cli(capsys, "prepare", micro.write_spec(tmp_path / "a.yaml", store))[0] == 0
    changed = micro.write_spec(tmp_path / "b.yaml", store, **{"train.lambda": 0.7})
    code, err = cli(capsys, "prepare", changed)
    assert code == BAD_INPUT_EXIT_CODE
    assert "changes the config hash of train/model, eval/report: run with --redo train" in err
    code, err = cli(capsys, "run", changed, "--redo", "eval", "--stages", "split")
    assert code == BAD_INPUT_EXIT_CODE and "--redo eval keeps train/model, whose settings changed: run with --redo train" in err
    assert cli(capsys, "run", changed, "--redo", "train", "--stages", "split")[0] == 0
    record = json.loads((store / RUN_RECORD).read_text())
    assert record["spec"]["train"]["lambda"] == 0.7 and record["outputs"]
    # a setting no output depends on is simply adopted
    cadence = micro.write_spec(tmp_path / "c.yaml", store, **{"train.lambda": 0.7, "train.keep_checkpoints": 5})
    assert cli(capsys, "prepare", cadence)[0] == 0
    # and a changed split is for --redo split
    code, err = cli(capsys, "prepare", micro.write_spec(tmp_path / "d.yaml", store, **{"split.block_tokens": 48}))
    assert code == BAD_INPUT_EXIT_CODE and "run with --redo split" in err


def test_two_runs_of_the_same_spec_at_once_finish_once(micro, s3_endpoint, s3_bucket, tmp_path):
    """Two `fusion run` processes of one run on one S3 store: both finish, and every commit
    record is PUT exactly once (counted at a proxy)."""
    proxy = FaultyProxy(s3_endpoint, rate=0.0)
    try:
        spec = micro.spec(f"s3://{s3_bucket}/run", **{"split.shard_blocks": 8, "corpus.max_documents": 14})
        spec["store_options"] = options_for(proxy.url).model_dump()
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "fusion", "run", str(path), "--stages", "split,vocab"]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
        puts = record_puts(proxy.writes, "/")
        run = open_run(parse_spec(spec))
        expected = set()
        for stage in ("split", "vocab"):
            for part in STAGES[stage].parts(run):
                names = ["_COMMITTED.json"] + [f"shard-{i:05d}.json" for i in range(STAGES[stage].shard_count(run, part))]
                expected |= {f"/{s3_bucket}/run/{stage}/{part}/{name}" for name in names}
        assert set(puts) == expected and set(puts.values()) == {1}, {k: v for k, v in puts.items() if v != 1}
    finally:
        proxy.stop()


def test_a_trainer_deletes_only_its_own_checkpoints(micro, tmp_path):
    run = open_run(parse_spec(micro.spec(tmp_path / "store")))
    store = run.store
    for step in (2, 4, 6):
        store.write_json(f"{checkpoint.step_dir(step)}/{checkpoint.WRITER}", checkpoint.writer(run))
        store.write_bytes(f"{checkpoint.step_dir(step)}/rank-00000.pt", b"ours")
    store.write_json(f"{checkpoint.step_dir(3)}/{checkpoint.WRITER}", {"run_id": "someone-else", "config_hash": "0" * 16})
    store.write_bytes(f"{checkpoint.step_dir(1)}/rank-00000.pt", b"no writer recorded")
    checkpoint.prune(run, latest=4, keep=1)
    left = sorted(name for name in store.list(checkpoint.CHECKPOINTS) if store.find(f"{checkpoint.CHECKPOINTS}/{name}"))
    assert left == ["step-0000001", "step-0000003", "step-0000004"]  # 2 (old) and 6 (debris) were ours
