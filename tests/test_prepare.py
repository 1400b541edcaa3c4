"""`fusion prepare`: the first workload of a run on Kubernetes. It checks the spec, models and
corpus, plans the shards, and writes run.json with every output's config hash and shard count,
which is all the controller needs to follow the run without loading a model."""

from __future__ import annotations

from fusion.cli import main
from fusion.config import parse_spec
from fusion.pipeline import STAGES, open_run
from fusion.run import RUN_RECORD


def test_prepare_records_every_output(micro, tmp_path, capsys):
    store = tmp_path / "store"
    spec_path = micro.write_spec(tmp_path / "run.yaml", store)
    assert main(["prepare", str(spec_path)]) == 0
    assert "shard(s)" in capsys.readouterr().out
    run = open_run(parse_spec(micro.spec(store)))
    record = run.store.read_json(RUN_RECORD)
    planned = len(run.store.read_json("split/_plan.json")["shards"])
    assert record["spec_hash"] == run.spec_hash()
    expected = {f"{stage}/{part}" for stage, module in STAGES.items() for part in module.parts(run)}
    assert set(record["outputs"]) == expected
    for key, output in record["outputs"].items():
        stage, part = key.split("/")
        assert output["config_hash"] == run.hash(stage, part)
        assert output["shards"] == (1 if stage in ("vocab", "train", "eval") else planned)
    assert not run.store.exists("split/train/_COMMITTED.json"), "prepare computes nothing"


def test_prepare_refuses_bad_input(micro, tmp_path, capsys):
    spec_path = micro.write_spec(tmp_path / "run.yaml", tmp_path / "store", **{"corpus.path": str(tmp_path / "missing.jsonl")})
    assert main(["prepare", str(spec_path)]) == 3
    assert "missing.jsonl" in capsys.readouterr().err
