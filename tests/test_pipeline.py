"""A whole micro run: every stage, a loadable fused model, a report; then kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fusion.config import parse_spec
from fusion.launch_local import run_all
from fusion.pipeline import open_run
from fusion.status import status

REPO = Path(__file__).resolve().parents[1]


def committed_outputs(store: Path) -> dict[str, bytes]:
    """Every file of a run's committed outputs (not logs, checkpoints, or run.json, which names the store)."""
    out = {}
    for f in sorted(store.rglob("*")):
        rel = f.relative_to(store).as_posix()
        if f.is_file() and rel != "run.json" and not rel.startswith(("logs/", "train/checkpoints/")) and ".tmp-" not in rel:
            out[rel] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def finished(micro, tmp_path_factory):
    store = tmp_path_factory.mktemp("runs") / "reference"
    run = open_run(parse_spec(micro.spec(store)))
    timings = run_all(run)
    return run, store, timings


def test_every_stage_completes(finished):
    run, store, timings = finished
    assert list(timings) == ["split", "vocab", "logits", "align", "fuse", "train", "eval"]
    parts = status(str(store))["parts"]
    assert all(p["complete"] and p["shards"] == p["total"] for p in parts), parts
    tokens = {p["part"]: p["rows"] for p in parts if p["stage"] == "logits"}
    assert all(n > 1000 for n in tokens.values())


def test_fused_model_loads_and_report_is_complete(finished):
    from transformers import AutoModelForCausalLM

    run, store, _ = finished
    model_dir = store / "train/model/shard-00000.files"
    assert (model_dir / "model.safetensors").exists() and "src-neox" in (model_dir / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(run.tokenizers["target"])
    report = json.loads((store / "eval/report/shard-00000.files/report.json").read_text())
    names = [r["model"] for r in report["results"]]
    assert names == ["target (before)", "target (fused)", "src-llama", "src-neox"]
    assert all(0 < r["bits_per_byte"] < 20 for r in report["results"])
    assert report["results"][0]["bits_per_byte"] != report["results"][1]["bits_per_byte"]
    assert set(report["coverage"]) == {"src-llama", "src-neox"}
    assert (store / "eval/report/shard-00000.files/report.png").read_bytes()[:4] == b"\x89PNG"


def test_the_saved_tokenizer_starts_texts_with_bos_as_training_did(finished):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, store, _ = finished
    model_dir = store / "train/model/shard-00000.files"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = run.tokenizers["target"].bos_token_id
    text = "def main():\n    return 0"
    plain = run.tokenizers["target"](text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text)["input_ids"] == [bos, *plain]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    as_users_call_it = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    by_hand = model.generate(torch.tensor([[bos, *plain]]), max_new_tokens=8, do_sample=False)
    assert as_users_call_it.tolist() == by_hand.tolist()


def test_second_run_reuses_everything(finished):
    run, store, _ = finished
    before = committed_outputs(store)
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("shard-*.json")}
    run_all(open_run(run.spec))
    assert committed_outputs(store) == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in store.rglob("shard-*.json")}


def test_changed_settings_are_refused(finished, capsys):
    from fusion.cli import main

    run, store, _ = finished
    spec_path = store.parent / "changed.yaml"
    spec = run.spec.model_dump(mode="json", by_alias=True)
    spec["logits"]["top_k"] = 4
    spec_path.write_text(json.dumps(spec))
    assert main(["run", str(spec_path)]) == 3
    assert "config hash" in capsys.readouterr().err


KILL_POINTS = [
    "logits/src-llama/shard-00000.json",
    "align/src-neox/shard-00000.json",
    "train/checkpoints/latest.json",
    "train/model/_COMMITTED.json",
]


def test_sigkill_at_any_point_then_rerun_is_byte_identical(finished, micro, tmp_path):
    _, reference, _ = finished
    store = tmp_path / "killed"
    spec = micro.write_spec(tmp_path / "spec.yaml", store)
    cmd = [sys.executable, "-m", "fusion", "run", str(spec)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for marker in KILL_POINTS:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not (store / marker).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before {marker}: {proc.stderr.read().decode()[-2000:]}"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    mine, theirs = committed_outputs(store), committed_outputs(reference)
    assert sorted(mine) == sorted(theirs)
    assert [name for name in mine if mine[name] != theirs[name]] == []


def test_fusing_a_subset_of_sources_reuses_the_upstream_stages(finished, micro, tmp_path):
    """fuse.sources: single-source distillation on the very same blocks, logits and alignments."""
    from fusion.stages import fuse

    run, store, _ = finished
    variant = tmp_path / "single"
    variant.mkdir()
    for stage in ("split", "vocab", "logits", "align"):  # shared by links, as bench/replicate.py does
        (variant / stage).symlink_to(store / stage)
    single = open_run(parse_spec(micro.spec(variant, **{"fuse.sources": ["src-neox"]})))
    assert single.hash("align", "src-neox") == run.hash("align", "src-neox")
    assert single.hash("fuse", fuse.PART) != run.hash("fuse", fuse.PART)
    run_all(single, ["fuse"])
    shards = range(fuse.shard_count(run, fuse.PART))
    both = {k: np.concatenate([fuse.read(run, i)[k] for i in shards]) for k in ("tokens", "choice", "counts", "ids")}
    one = {k: np.concatenate([fuse.read(single, i)[k] for i in shards]) for k in ("tokens", "choice", "counts", "ids")}
    assert len(one["tokens"]) > 0 and (one["tokens"] == both["tokens"]).all()
    assert one["choice"].max() <= 1  # the target itself or its one source
    assert (one["counts"] != both["counts"]).any() or (one["ids"].shape != both["ids"].shape)


def test_sampled_teachers_go_through_to_training(micro, tmp_path):
    """logits.method: sampled: rows of estimates that sum to 1 flow through align, fuse and train."""
    from fusion.stages import fuse, logits

    small = {"corpus.max_documents": 14, "split.shard_blocks": 400}  # one shard of a few dozen blocks
    run = open_run(parse_spec(micro.spec(tmp_path / "sampled", **small, **{"logits.method": "sampled"})))
    top_k = open_run(parse_spec(micro.spec(tmp_path / "top-k", **small, **{"logits.method": "top-k"})))
    assert run.hash("logits", "target") != top_k.hash("logits", "target")
    timings = run_all(run, ["split", "vocab", "logits", "align", "fuse", "train"])
    assert list(timings) == ["split", "vocab", "logits", "align", "fuse", "train"]
    for model in ("target", "src-llama", "src-neox"):
        rows = logits.read(run, model, 0)
        assert len(rows["tokens"]) > 1000 and (rows["tail"] == 0).mean() > 0.99
        assert np.allclose(np.exp(rows["topk_logprobs"].astype(np.float64)).sum(1) + rows["tail"], 1, atol=3e-3)
        per_block = np.add.reduceat(rows["nll"].astype(np.float64), rows["seq_ptr"][:-1])
        assert np.allclose(rows["seq_nll"], per_block, rtol=1e-2)  # the models' own NLL, not the estimates
    packed = fuse.read(run, 0)
    assert len(packed["tokens"]) > 1000 and (packed["counts"] > 0).all()
    assert (tmp_path / "sampled/train/model/shard-00000.files/model.safetensors").exists()
