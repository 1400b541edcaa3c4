"""Capture once, fuse many times (fusion/capture.py): a second target of another architecture
and tokenizer, run against the first run's store as its capture store, computes no source
logits and ends with exactly what a from-scratch run of that target makes."""

from __future__ import annotations

import dataclasses

import pytest

from fusion import pipeline, shards, tiny
from fusion.config import parse_spec
from fusion.launch_local import run_all
from fusion.run import Run
from fusion.stages import logits

STAGES = ["split", "vocab", "logits", "align", "fuse"]


@pytest.fixture(scope="module")
def second_target(tmp_path_factory):
    """A GPT-2 target with its own byte-level tokenizer (the micro target is a Llama with a
    SentencePiece-style one)."""
    folder = tmp_path_factory.mktemp("gpt2-target")
    texts = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:30])]
    tok = tiny.train_tokenizer("byte-level", texts, 550)
    model = tiny.make_model("gpt2", len(tok), hidden=32, layers=1, tokenizer=tok, seed=5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def arrays_of(run: Run, stage: str, part: str) -> list[dict]:
    """Per shard, each array's checksum, from the commit records."""
    out = []
    for i in sorted(shards.committed_indices(run.store, stage, part)):
        record = shards.read_record(run.store, stage, part, i, run.hash(stage, part))
        out.append({name: a["sha256"] for name, a in record["arrays"].items()})
    return out


def test_a_second_target_reuses_every_source_logits_shard(micro, second_target, tmp_path, monkeypatch):
    first = Run(parse_spec(micro.spec(tmp_path / "first")))
    run_all(first, STAGES)

    computed: dict[str, int] = {}
    real = logits.run_shard

    def counting(run, part, index):
        computed[part] = computed.get(part, 0) + 1
        return real(run, part, index)

    monkeypatch.setitem(pipeline.STAGES, "logits", dataclasses.replace(logits.STAGE, run_shard=counting))
    target = {"models.target": {"name": "gpt2-target", "path": str(second_target)}}
    reuse = Run(parse_spec(micro.spec(tmp_path / "second", **target, **{"capture.store": str(tmp_path / "first")})))
    run_all(reuse, STAGES)
    reused_counts = dict(computed)
    computed.clear()
    scratch = Run(parse_spec(micro.spec(tmp_path / "scratch", **target)))
    run_all(scratch, STAGES)

    n = len(shards.committed_indices(first.store, "split", "train"))
    assert reused_counts == {"gpt2-target": n}  # zero source-logits shards recomputed
    assert computed == {"gpt2-target": n, "src-llama": n, "src-neox": n}
    for source in ("src-llama", "src-neox"):
        assert reuse.hash("logits", source) == first.hash("logits", source)
        assert arrays_of(reuse, "logits", source) == arrays_of(first, "logits", source)
    assert reuse.hash("split", "train") == first.hash("split", "train") == scratch.hash("split", "train")
    for stage, part in [("logits", "gpt2-target"), ("align", "src-llama"), ("align", "src-neox"), ("fuse", "train")]:
        assert reuse.hash(stage, part) == scratch.hash(stage, part)
        assert arrays_of(reuse, stage, part) == arrays_of(scratch, stage, part), (stage, part)
        assert len(arrays_of(reuse, stage, part)) == n
