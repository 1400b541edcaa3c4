"""Bad input to the train stage: a one-line error naming the culprit and exit code 3 (never
retried), or, for a few corrupt teacher rows, skipping them and counting."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from fusion import shards
from fusion.cli import main
from fusion.config import parse_spec
from fusion.errors import BAD_INPUT_EXIT_CODE, FusionError
from fusion.pipeline import open_run
from fusion.stages import fuse, train
from fusion.training import distributed, engine
from tests.packed import write_packed
from tests.test_train import MODEL, SETTINGS, env, log_of, one_thread  # noqa: F401 (autouse fixture)


def prepared(micro, tmp_path, corrupt=None, **overrides):
    store = tmp_path / "store"
    spec = micro.spec(store, **{**SETTINGS, **overrides})
    run = open_run(parse_spec(spec))
    write_packed(run, blocks_per_shard=12, corrupt=corrupt)
    path = micro.write_spec(tmp_path / "spec.yaml", store, **{**SETTINGS, **overrides})
    return run, path


def fusion_train_cli(capsys, path, *more) -> tuple[int, str]:
    code = main(["train", str(path), *more])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_token_ids_beyond_the_logits(micro, tmp_path, capsys):
    run, path = prepared(micro, tmp_path, corrupt={(1, 5): "id"})
    code, err = fusion_train_cli(capsys, path)
    assert code == BAD_INPUT_EXIT_CODE
    vocab = len(run.tokenizers["target"])
    assert err.startswith("fusion: error: train: fuse/train/shard-00001 block 5 holds token id")
    assert f"id {vocab + 7}" in err
    assert "another tokenizer" in err


def test_packed_for_another_target_tokenizer(micro, tmp_path, capsys):
    run, path = prepared(micro, tmp_path)
    rel = shards.record_path(fuse.NAME, fuse.PART, 2)
    record = run.store.read_json(rel)
    record["attrs"]["target_tokenizer"] = "0123456789abcdef"
    run.store.write_json(rel, record)
    code, err = fusion_train_cli(capsys, path)
    assert code == BAD_INPUT_EXIT_CODE
    assert "fuse/train/shard-00002.json was packed for a target tokenizer with hash 0123456789abcdef" in err
    assert not (tmp_path / "store/train").exists()


def test_nan_teacher_rows_are_skipped_and_counted(micro, tmp_path, capsys):
    corrupt = {(0, 3): "nan", (2, 7): "nan"}
    run, path = prepared(micro, tmp_path, corrupt=corrupt)
    assert main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert "skipped fuse/train/shard-00000 block 3: non-finite teacher data" in err
    assert "skipped fuse/train/shard-00002 block 7: non-finite teacher data" in err
    log = log_of(tmp_path / "store")
    assert sum(e["skipped"] for e in log) == 2
    assert all(0 < e["loss"] < 20 for e in log)
    assert "2 block(s) skipped" in (tmp_path / "store" / MODEL / "README.md").read_text()


def test_too_many_bad_blocks_abort(micro, tmp_path, capsys):
    corrupt = {(0, 3): "nan", (1, 1): "nan", (2, 7): "nan"}
    _, path = prepared(micro, tmp_path, corrupt=corrupt, **{"train.max_skipped_blocks": 2})
    code, err = fusion_train_cli(capsys, path)
    assert code == BAD_INPUT_EXIT_CODE
    assert "3 blocks skipped for non-finite teacher data, more than train.max_skipped_blocks=2" in err


def test_a_checkpoint_of_another_config_is_refused(micro, tmp_path, capsys):
    run, path = prepared(micro, tmp_path)
    assert main(["train", str(path)]) == 0
    run.store.remove("train/model")  # as if killed before the export: only checkpoints remain
    code, err = fusion_train_cli(capsys, path, "--set", "train.lambda=0.7")
    assert code == BAD_INPUT_EXIT_CODE
    assert "train/checkpoints/latest.json is a checkpoint of config hash" in err and "--redo train" in err
    # checkpoint cadence is not part of the config: the same checkpoint resumes
    assert main(["train", str(path), "--set", "train.checkpoint_every=3"]) == 0


def test_a_deepspeed_checkpoint_of_another_world_size_is_refused(micro, tmp_path):
    """Written by one process (DeepSpeed, a world of one, in this process), resumed by two:
    the workers refuse, and the pod's launcher passes their exit code 3 on."""
    run, path = prepared(micro, tmp_path, **{"train.engine": "deepspeed"})
    train.run_shard(run, train.PART, 0)
    run.store.remove("train/model")
    proc = subprocess.run(
        [sys.executable, "-m", "fusion", "train", str(path)],
        env=env(PET_NPROC_PER_NODE=2),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == BAD_INPUT_EXIT_CODE, proc.stderr[-3000:]
    assert "was written by 1 ranks, this job has 2: ZeRO partitions are per rank" in proc.stderr


def test_a_diverging_model_stops_before_stepping(micro, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-target"
    shutil.copytree(micro.models["target"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    _, path = prepared(micro, tmp_path, **{"models.target.path": str(broken)})
    code, err = fusion_train_cli(capsys, path)
    assert code == BAD_INPUT_EXIT_CODE
    assert "train: the loss is not finite at step 1" in err


def test_deepspeed_blocks_that_would_override_the_trainer_are_refused(micro, tmp_path):
    for block, needle in (
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is set by the trainer"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer' is set by the trainer"),
        ({"zero_optimization": {"stage": 1}}, "'zero_optimization.stage' is set by train.zero_stage"),
    ):
        with pytest.raises(FusionError, match="key 'train.deepspeed'") as err:
            parse_spec(micro.spec(tmp_path, **{"train.deepspeed": block}))
        assert needle in str(err.value)
    spec = parse_spec(micro.spec(tmp_path, **{"train.deepspeed": {"zero_optimization": {"overlap_comm": True}}}))
    layout = engine.batch_layout(spec.train, 1)
    config = engine.deepspeed_config(spec.train, layout, "fp32")
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}


def test_batch_layout_must_divide(micro, tmp_path):
    spec = parse_spec(micro.spec(tmp_path, **{"train.batch_size": 8, "train.micro_batch_size": 3})).train
    with pytest.raises(FusionError, match="not divisible by the world size 3"):
        engine.batch_layout(spec, 3)
    with pytest.raises(FusionError, match="micro_batch_size=3 does not divide the 4 blocks per rank"):
        engine.batch_layout(spec, 2)
    assert engine.batch_layout(spec.model_copy(update={"micro_batch_size": 2}), 2) == engine.Layout(4, 2, 2)


def test_torch_engine_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FusionError, match="train.engine=torch trains in one process, but WORLD_SIZE=2"):
        distributed.init(engine.TorchEngine)


def test_bf16_needs_a_gpu(micro, tmp_path):
    spec = parse_spec(micro.spec(tmp_path, **{"train.precision": "bf16"})).train
    with pytest.raises(FusionError, match="train.precision=bf16 needs a CUDA device"):
        engine.resolve_precision(spec, "cpu")
    assert engine.resolve_precision(spec, "cuda:0") == "bf16"
    auto = spec.model_copy(update={"precision": "auto"})
    assert engine.resolve_precision(auto, "cpu") == "fp32" and engine.resolve_precision(auto, "cuda:0") == "bf16"
