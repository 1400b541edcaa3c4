"""The train stage: one process (torch engine), DeepSpeed ZeRO-2 and ZeRO-3 over two gloo
processes, two "nodes" on loopback, resume after SIGKILL and after SIGTERM, the export, the logs.

Packed data is made up (tests/packed.py), so these tests need neither logits nor alignment.
Processes started here use one thread each: on a shared 2-core machine two OpenMP threads per
process can make a step 20x slower, and results are compared only between runs with the same
threading (bitwise) or with a tolerance (across engines).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusion import shards
from fusion.config import parse_spec
from fusion.loss import fusion_loss
from fusion.pipeline import open_run
from fusion.run import Run
from fusion.stages import train
from fusion.training import data, distributed, engine, metrics
from tests.packed import write_packed
from tests.s3 import S3_BACKENDS, new_bucket, options_for

REPO = Path(__file__).resolve().parents[1]
MODEL = "train/model/shard-00000.files"

# 3 split shards of 12 blocks: 36 blocks, 9 steps of 4 blocks per epoch
SETTINGS = {
    "split.shard_blocks": 200,
    "train.batch_size": 4,
    "train.micro_batch_size": 2,
    "train.lr": 3e-3,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 2,
    "train.epochs": 1,
}
LONG = {**SETTINGS, "train.epochs": 3, "train.engine": "deepspeed"}  # 27 steps: time to interrupt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run(micro, store: Path, **overrides) -> Run:
    run = open_run(parse_spec(micro.spec(store, **{**SETTINGS, **overrides})))
    write_packed(run, blocks_per_shard=12)
    return run


def spec_file(micro, store: Path, **overrides) -> Path:
    """A store with packed data and the spec file that names it."""
    make_run(micro, store, **overrides)
    return micro.write_spec(store.parent / f"{store.name}.yaml", store, **{**SETTINGS, **overrides})


def log_of(store: Path) -> list[dict]:
    return json.loads((store / MODEL / "train_log.json").read_text())


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        out.pop(k, None)
    out.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    return {**out, **{k: str(v) for k, v in extra.items()}}


def fusion_train(spec: Path, **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fusion", "train", str(spec)],
        env=env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_checkpoint(store: Path, proc: subprocess.Popen, step: int) -> None:
    latest = store / "train/checkpoints/latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step {step} appeared: {proc.communicate()[0][-3000:]}")


def assert_close_logs(a: list[dict], b: list[dict], rel: float) -> None:
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        for key in ("loss", "clm", "fusion"):
            assert x[key] == pytest.approx(y[key], rel=rel), (x["step"], key)
        assert x["lr"] == y["lr"] and x["tokens"] == y["tokens"] and x["choice"] == y["choice"]


# ---- one process -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(micro, tmp_path_factory):
    """The torch engine in this process: the 9-step run every other engine is compared with."""
    store = tmp_path_factory.mktemp("train") / "torch"
    run = make_run(micro, store)
    train.run_shard(run, train.PART, 0)
    return run, store


def test_first_step_is_the_fusion_loss_of_the_first_global_batch(reference, micro):
    """The logged loss of step 1 is lambda * CLM + (1 - lambda) * CE against the teacher over the
    first 4 blocks of the seeded order, token-weighted, computed here in one batch."""
    from transformers import AutoModelForCausalLM

    run, store = reference
    reader = data.PackedReader.for_run(run, 0, 1, micro_batch_size=4)
    batch = next(reader)
    reader.close()
    assert (batch.step, batch.last, len(batch.blocks)) == (0, True, 4)
    model = AutoModelForCausalLM.from_pretrained(micro.models["target"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.inputs, attention_mask=batch.mask).logits[:, :-1]
    out = fusion_loss(logits, batch.labels, batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail, lam=run.spec.train.lam)
    first = log_of(store)[0]
    assert first["tokens"] == batch.tokens == int(batch.mask.sum()) - 4
    assert first["loss"] == pytest.approx(float(out["loss"]), rel=1e-6)
    assert first["clm"] == pytest.approx(float(out["clm"]), rel=1e-6)
    assert first["fusion"] == pytest.approx(float(out["fusion"]), rel=1e-6)
    assert first["choice"] == batch.choice and sum(first["choice"]) == 4


def test_the_logged_learning_rate_is_the_warmup_cosine_schedule(reference):
    run, store = reference
    log = log_of(store)
    assert len(log) == 9
    spec = run.spec.train
    assert [e["lr"] for e in log] == [spec.lr * engine.lr_factor(s, 9, spec) for s in range(9)]
    assert log[0]["lr"] == pytest.approx(spec.lr / 2) and log[1]["lr"] == pytest.approx(spec.lr)
    assert log[-1]["lr"] < log[2]["lr"] and log[-1]["lr"] >= spec.lr * spec.min_lr_ratio
    applied = json.loads((store / "logs/train/engine.json").read_text())
    assert applied["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert applied["schedule"]["class"] == "torch.optim.lr_scheduler.LambdaLR"


def test_export_is_a_loadable_model_with_a_card(reference, micro):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, store = reference
    folder = store / MODEL
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = load_file(micro.models["target"] / "model.safetensors")
    after = load_file(folder / "model.safetensors")
    assert set(after) <= set(before) and any(not torch.equal(before[k], after[k]) for k in after)
    assert model.config.use_cache
    card = (folder / "README.md").read_text()
    for needle in ("src-llama", "src-neox", "FuseLLM", "mince", str(micro.corpus), "9 steps", "torch on 1 rank(s)"):
        assert needle in card, needle


def test_checkpoints_keep_the_newest_two(reference):
    _, store = reference
    steps = sorted(p.name for p in (store / "train/checkpoints").glob("step-*"))
    assert steps == ["step-0000006", "step-0000008"]
    assert json.loads((store / "train/checkpoints/latest.json").read_text())["step"] == 8


def test_tensorboard_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, store = reference
    events = EventAccumulator(str(store / "logs/train/tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {"loss/total", "loss/clm", "loss/fusion", "lr", "grad_norm", "throughput/tokens_per_s"}
    want.add("data/skipped_blocks")
    assert want | {"choice/target", "choice/src-llama", "choice/src-neox"} <= tags
    log = log_of(store)
    assert [e.value for e in events.Scalars("loss/clm")] == pytest.approx([e["clm"] for e in log])
    shares = [sum(events.Scalars(f"choice/{n}")[0].value for n in ("target", "src-llama", "src-neox"))]
    assert shares == pytest.approx([1.0])


def test_the_progress_record_says_how_far_training_is(reference):
    """logs/train/progress.json, which the controller's status shows (fusion/k8s/observe.py):
    after the last step, every step and every token; no part of the committed model."""
    run, store = reference
    record = metrics.read_progress(run.store, run.hash(train.NAME, train.PART))
    log = log_of(store)
    assert (record["step"], record["steps"], record["tokens"]) == (9, 9, sum(e["tokens"] for e in log))
    assert record["tokens_per_second"] > 0 and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", record["updated_at"])
    assert metrics.read_progress(run.store, "0" * 16) is None, "another configuration's record is not shown"
    committed = shards.read_record(run.store, train.NAME, train.PART, 0)
    assert metrics.PROGRESS.startswith("logs/") and not any("progress" in name for name in committed["files"])


def test_micro_batching_does_not_change_the_result(reference, micro, tmp_path):
    run = make_run(micro, tmp_path / "whole", **{"train.micro_batch_size": None})
    train.run_shard(run, train.PART, 0)
    assert_close_logs(log_of(tmp_path / "whole"), log_of(reference[1]), rel=1e-5)


@pytest.mark.parametrize("backend", ["memory", *S3_BACKENDS])
def test_resume_from_a_remote_store_is_bitwise(micro, tmp_path, request, backend):
    """A run on a non-local store (memory://, moto's S3 emulator, SeaweedFS: files go through
    upload and download), cut back to its step-4 checkpoint as if killed right after it (16 of
    its 36 blocks read, from shards of 12), continues bitwise."""
    settings = {**SETTINGS, "train.keep_checkpoints": 10}
    if backend == "memory":
        spec = micro.spec(f"memory://resume-{os.getpid()}", **settings)
    else:
        endpoint = request.getfixturevalue("s3_servers").endpoint(backend)
        spec = micro.spec(f"s3://{new_bucket(endpoint, 'resume')}/run", **settings)
        spec["store_options"] = options_for(endpoint).model_dump(exclude_none=True)
    run = open_run(parse_spec(spec))
    write_packed(run, blocks_per_shard=12)
    train.run_shard(run, train.PART, 0)
    store = run.store
    full = json.loads(store.read_bytes(f"{MODEL}/train_log.json"))
    weights = store.read_bytes(f"{MODEL}/model.safetensors")
    latest = store.read_json("train/checkpoints/latest.json")
    store.write_json("train/checkpoints/latest.json", {**latest, "step": 4, "path": "train/checkpoints/step-0000004"})
    store.remove("train/model")
    train.run_shard(open_run(run.spec), train.PART, 0)
    assert json.loads(store.read_bytes(f"{MODEL}/train_log.json")) == full
    assert store.read_bytes(f"{MODEL}/model.safetensors") == weights
    assert store.exists("logs/train/tensorboard")
    progress = metrics.read_progress(store, run.hash(train.NAME, train.PART))
    assert progress["tokens"] == sum(e["tokens"] for e in full), "the resumed run counts the steps before its checkpoint"


# ---- DeepSpeed over two processes --------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero2_long(micro, tmp_path_factory):
    """ZeRO-2 on two gloo processes of one node, 27 steps, started as a PyTorchJob pod would."""
    store = tmp_path_factory.mktemp("train") / "zero2"
    out = finish(fusion_train(spec_file(micro, store, **LONG), PET_NPROC_PER_NODE=2))
    return store, out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one_process(stage, reference, micro, tmp_path):
    """Same global batches, same losses as the torch engine in one process, to 1e-5 relative:
    only the order of float32 sums differs (gradients reduced over ranks, ZeRO's flat buffers).
    ZeRO-3 runs with gradient checkpointing, which recomputes the same activations."""
    store = tmp_path / f"zero{stage}"
    settings = {"train.engine": "deepspeed", "train.zero_stage": stage, "train.gradient_checkpointing": stage == 3}
    out = finish(fusion_train(spec_file(micro, store, **settings), PET_NPROC_PER_NODE=2))
    assert "built successfully" not in out  # no op compiled at run time
    assert_close_logs(log_of(store), log_of(reference[1]), rel=1e-5)
    applied = json.loads((store / "logs/train/engine.json").read_text())
    assert applied["world_size"] == 2 and applied["zero_stage"] == stage
    assert applied["gradient_checkpointing"] == (stage == 3)
    assert applied["optimizer"]["class"] == "torch.optim.adamw.AdamW" and applied["optimizer"]["stepped_by"]
    assert applied["schedule"]["class"] == "torch.optim.lr_scheduler.LambdaLR"
    assert "optimizer" not in applied["deepspeed_config"] and "scheduler" not in applied["deepspeed_config"]
    # the export gathers ZeRO-3's partitioned weights into a whole model
    from safetensors.torch import load_file

    ours, ref = load_file(store / MODEL / "model.safetensors"), load_file(reference[1] / MODEL / "model.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-5)


def test_two_nodes_on_loopback_match_one_node(zero2_long, micro, tmp_path):
    """Two torchrun agents, one process each, in the environment the training operator sets for
    a Master and a Worker pod (c10d rendezvous at MASTER_ADDR:MASTER_PORT). The same world size
    and rank-to-data mapping as two processes on one node: bitwise the same losses."""
    store = tmp_path / "two-nodes"
    spec = spec_file(micro, store, **LONG)
    port = free_port()
    pods = [
        fusion_train(
            spec,
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=2, RANK=node,
            PET_NNODES=2, PET_NPROC_PER_NODE=1, PET_NODE_RANK=node,
        )
        for node in (0, 1)
    ]
    outs = [finish(p) for p in pods]
    assert log_of(store) == log_of(zero2_long[0]), outs[0][-2000:]
    assert json.loads((store / "logs/train/engine.json").read_text())["world_size"] == 2


def test_sigterm_checkpoints_and_the_resumed_run_is_bitwise(zero2_long, micro, tmp_path):
    """Preemption: SIGTERM to the pod's launcher (torchrun's agent) reaches both workers; they
    checkpoint at the end of the step and exit 143. The restarted job ends bitwise where the
    uninterrupted one did: the same log, the same exported bytes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "preempted"
    spec = spec_file(micro, store, **LONG)
    proc = fusion_train(spec, PET_NPROC_PER_NODE=2)
    wait_for_checkpoint(store, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    stopped = json.loads((store / "train/checkpoints/latest.json").read_text())["step"]
    assert 2 <= stopped < 27 and not (store / MODEL).exists()
    assert "SIGTERM; checkpoint of step" in out
    finish(fusion_train(spec, PET_NPROC_PER_NODE=2))
    reference = zero2_long[0]
    assert log_of(store) == log_of(reference)
    assert (store / MODEL / "model.safetensors").read_bytes() == (reference / MODEL / "model.safetensors").read_bytes()
    events = EventAccumulator(str(store / "logs/train/tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, 28))


def test_sigkill_then_restart_continues_bitwise(micro, tmp_path):
    """The torch engine in its own process, killed with SIGKILL after its step-4 checkpoint,
    restarted, ends bitwise where the same run in this process (one thread each) ends."""
    settings = {"train.epochs": 3}
    reference = make_run(micro, tmp_path / "uninterrupted", **settings)
    train.run_shard(reference, train.PART, 0)
    killed = tmp_path / "killed"
    spec = spec_file(micro, killed, **settings)
    proc = fusion_train(spec)
    wait_for_checkpoint(killed, proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / MODEL).exists()
    finish(fusion_train(spec))
    uninterrupted = tmp_path / "uninterrupted"
    assert log_of(killed) == log_of(uninterrupted) and len(log_of(uninterrupted)) == 27
    weights = MODEL + "/model.safetensors"
    assert (killed / weights).read_bytes() == (uninterrupted / weights).read_bytes()


# ---- launch --------------------------------------------------------------------------------------------
def test_torchrun_arguments_from_the_pytorchjob_environment():
    operator_env = {
        "MASTER_ADDR": "fuse-train-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "16", "RANK": "1",
        "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
    }
    assert distributed.torchrun_args(["/spec/run.yaml", "--store", "s3://b/run"], operator_env) == [
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=fuse-train-master-0:23456",
        "--rdzv-id=fusion-train", "-m", "fusion", "train", "/spec/run.yaml", "--store", "s3://b/run",
    ]
    assert distributed.torchrun_args(["s.yaml"], {})[:3] == ["--nnodes=1", "--nproc-per-node=1", "--standalone"]
    elastic = {"PET_NNODES": "1:3", "PET_NPROC_PER_NODE": "4", "PET_RDZV_BACKEND": "c10d"}
    elastic["PET_RDZV_ENDPOINT"] = "job-worker-0:23456"
    expected = ["--nnodes=1:3", "--nproc-per-node=4", "-m", "fusion", "train", "s.yaml"]
    assert distributed.torchrun_args(["s.yaml"], elastic) == expected


def test_torchrun_arguments_from_the_trainjob_environment():
    """Kubeflow Trainer v2's torch plugin sets PET_* only: node 0's address is PET_MASTER_ADDR."""
    trainer_env = {
        "PET_NNODES": "4", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "2",
        "PET_MASTER_ADDR": "fuse-train-node-0-0.fuse-train", "PET_MASTER_PORT": "29400",
    }
    assert distributed.torchrun_args(["/etc/fusion/run.yaml"], trainer_env) == [
        "--nnodes=4", "--nproc-per-node=auto", "--rdzv-backend=c10d", "--rdzv-endpoint=fuse-train-node-0-0.fuse-train:29400",
        "--rdzv-id=fusion-train", "-m", "fusion", "train", "/etc/fusion/run.yaml",
    ]


def test_training_without_tensorboard_logs_a_line_and_goes_on(monkeypatch, capsys, tmp_path):
    """tensorboard comes with the `train` extra only: an install without it (the CPU image) trains
    all the same, without the curves, and says so once."""
    import sys

    from fusion.training import metrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    world = distributed.World(rank=0, size=1, local_rank=0, device="cpu", distributed=False)
    assert metrics.open_board(None, world, tmp_path, 0) is None
    assert "tensorboard is not installed" in capsys.readouterr().err
