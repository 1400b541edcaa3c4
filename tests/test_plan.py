"""`fusion plan`: the figures of a run before it runs, checked against what the stages then do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fusion import shards
from fusion.cli import main
from fusion.config import load_spec, parse_spec
from fusion.errors import BAD_INPUT_EXIT_CODE
from fusion.launch import AllShards, run_part
from fusion.plan import MEASURED, SAMPLED_LOGITS_RATIO, make_plan
from fusion.pipeline import open_run
from fusion.stages import split
from tests.packed import write_packed

REPO = Path(__file__).resolve().parents[1]


def rows(plan, stage):
    return {r.part: r for r in plan.rows if r.stage == stage}


def test_the_plan_of_a_readable_corpus_matches_what_split_then_makes(micro, tmp_path):
    spec = parse_spec(micro.spec(tmp_path / "store", **{"split.shard_blocks": 8}))
    plan = make_plan(spec, throughput={"logits": 1000.0, "train": 500.0})
    run = open_run(spec)
    run_part(run, "split", "train", AllShards())
    made = split.plan(run)
    assert rows(plan, "split")["train+heldout"].shards == len(made["shards"])
    blocks = sum(shards.read_record(run.store, "split", "train", i)["rows"] for i in range(len(made["shards"])))
    assert plan.train["blocks"] == pytest.approx(blocks, rel=0.25)
    # tokens per model: the plan's, from a sample, against the tokenizers on every training block
    for name, row in rows(plan, "logits").items():
        texts = [t for i in range(len(made["shards"])) for t in split.read_blocks(run, "train", i)[0]]
        real = sum(len(ids) for ids in run.tokenizers[name](texts, add_special_tokens=False)["input_ids"])
        assert row.tokens == pytest.approx(real, rel=0.15), name
        ratio = SAMPLED_LOGITS_RATIO if spec.logits.method == "sampled" else 1.0
        assert row.store_bytes == pytest.approx(row.tokens * MEASURED["logits"][0] * spec.logits.top_k / 10 * ratio, rel=1e-4)
        assert row.hours == pytest.approx(row.tokens / 1000 / 3600, rel=1e-4)
    assert "measured on a corpus sample" in plan.inputs["text bytes per token: target"][1]
    assert rows(plan, "train")["model"].note.startswith(f"{plan.train['steps']:,} steps")
    assert plan.train["steps"] == math.ceil(plan.train["blocks"] / spec.train.batch_size)


def test_a_pilot_store_gives_the_measured_bytes_per_token(micro, tmp_path):
    pilot = open_run(parse_spec(micro.spec(tmp_path / "pilot")))
    write_packed(pilot, blocks_per_shard=12)
    status = shards.part_status(pilot.store, "fuse", "train")
    spec = parse_spec(micro.spec(tmp_path / "big"))
    plan = make_plan(spec, tokens=1e6, pilot=str(tmp_path / "pilot"))
    assert plan.inputs["stored bytes per token: fuse"][0] == round(status.stored_bytes / status.rows, 2)
    fuse_row = rows(plan, "fuse")["train"]
    assert fuse_row.store_bytes == pytest.approx(fuse_row.tokens * status.stored_bytes / status.rows)
    assert plan.inputs["stored bytes per token: logits"][1].startswith("bench/bench_bytes.py")


def test_paper_scale_plan_from_given_figures(capsys):
    code = main([
        "plan", str(REPO / "jobs/fusellm-minipile.yaml"), "--tokens", "1.4e9", "--documents", "1000000",
        "--gpus", "16", "--target-params", "6.74e9", "--throughput", "logits=11000", "--throughput", "train=2200",
        "--json",
    ])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    stages = {(s["stage"], s["part"]): s for s in plan["stages"]}
    assert {p for s, p in stages if s == "logits"} == {"llama-2-7b", "openllama-7b", "mpt-7b"}
    target = stages[("logits", "llama-2-7b")]
    assert target["tokens"] == 1_400_000_000 and target["store_bytes"] == pytest.approx(1.4e9 * MEASURED["logits"][0])
    assert target["hours"] == pytest.approx(1.4e9 / 11000 / 3600)
    assert stages[("train", "model")]["hours"] == pytest.approx(1.4e9 / 2200 / 3600)
    assert plan["train"]["steps"] == math.ceil(plan["train"]["blocks"] / 128)
    assert plan["train"]["lanes_divisible_by_processes"] and plan["train"]["reader_shards_per_rank"] == 16
    assert plan["total"]["gpu_hours"] == pytest.approx(3 * 1.4e9 / 11000 / 3600 + 1.4e9 / 2200 / 3600)
    assert np.isclose(plan["total"]["store_bytes"], sum(s["store_bytes"] for s in plan["stages"]))


def test_the_rows_are_the_pipelines_parts_and_a_capture_is_imported_not_charged(capsys):
    from fusion.pipeline import topology

    paper = ["plan", str(REPO / "jobs/fusellm-minipile.yaml"), "--tokens", "1.4e9", "--documents", "1000000",
             "--throughput", "logits=11000", "--json"]
    assert main(paper) == 0
    computed = json.loads(capsys.readouterr().out)
    pipeline = topology(load_spec(REPO / "jobs/fusellm-minipile.yaml"))
    for stage in ("vocab", "logits", "align", "fuse", "train", "eval"):
        assert [s["part"] for s in computed["stages"] if s["stage"] == stage] == pipeline.parts(stage), stage
    assert [s["part"] for s in computed["stages"] if s["stage"] == "split"] == ["+".join(pipeline.parts("split"))]

    assert main([*paper, "--set", "capture.store=s3://fusion-captures/minipile"]) == 0
    captured = json.loads(capsys.readouterr().out)
    logits = {s["part"]: s for s in captured["stages"] if s["stage"] == "logits"}
    for source in ("openllama-7b", "mpt-7b"):
        assert logits[source]["hours"] == 0.0
        assert logits[source]["note"] == "imported from capture store s3://fusion-captures/minipile"
        assert logits[source]["store_bytes"] > 0  # still copied into the run's store
    assert logits["llama-2-7b"]["hours"] == pytest.approx(1.4e9 / 11000 / 3600)  # the target's own: computed
    split_row = next(s for s in captured["stages"] if s["stage"] == "split")
    assert split_row["note"].endswith("; imported from capture store s3://fusion-captures/minipile")
    assert captured["total"]["gpu_hours"] == pytest.approx(computed["total"]["gpu_hours"] / 3)


def test_bad_input(capsys, tmp_path):
    spec = str(REPO / "jobs/fusellm-minipile.yaml")
    assert main(["plan", spec]) == BAD_INPUT_EXIT_CODE
    assert "corpus.path /data/minipile is not readable here; give its size with --tokens" in capsys.readouterr().err
    assert main(["plan", spec, "--tokens", "1e9", "--throughput", "logits=fast"]) == BAD_INPUT_EXIT_CODE
    assert "--throughput 'logits=fast': expected STAGE=TOKENS_PER_S" in capsys.readouterr().err
