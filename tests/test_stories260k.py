"""The one real pretrained model here, stories260K (its tokenizer strips leading and trailing
spaces and collapses runs of spaces), through split, vocab, logits and align as the target and
as a source, beside a micro model of another tokenizer family, on State of the Union speeches
given extra, leading and trailing spaces. The whole runs with their bits per byte are in the
README (jobs/stories260k-*.yaml); this is the cheap check that the alignment holds."""

import json

import pytest
import yaml

from fusion import shards
from fusion.cli import main
from fusion.store import Store

STORIES = "assets/model-stories260K-llama/hf"


def spaced_speeches(shared, count: int = 5, chars: int = 1500) -> list[str]:
    sotu = shared / "assets" / "corpus-sotu-en"
    text = (sotu / "sotu.txt").read_text(encoding="utf-8")
    speeches = []
    for line in (sotu / "sotu_index.jsonl").read_text().splitlines()[:count]:
        entry = json.loads(line)
        speech = text[entry["char_offset"] : entry["char_offset"] + entry["char_len"]][:chars]
        speeches.append("  " + speech.replace(". ", ".   ").replace(", ", ",  ") + "   ")
    return speeches


@pytest.mark.parametrize("role", ["target", "source"])
def test_stories260k_aligns_as_target_and_as_source(role, shared, micro, tmp_path, capsys):
    corpus = tmp_path / "spaced.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": "sotu"}) + "\n" for t in spaced_speeches(shared)))
    stories = {"name": "stories260k", "path": str(shared / STORIES)}
    if role == "target":
        models = {"target": stories, "sources": [{"name": "src-neox", "path": str(micro.models["src-neox"])}]}
    else:
        models = {"target": {"name": "target", "path": str(micro.models["target"])}, "sources": [stories]}
    store = tmp_path / "store"
    spec = micro.spec(store, **{"models": models, "corpus.path": str(corpus), "corpus.heldout_fraction": 0.1,
                                "split.block_tokens": 128})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    code = main(["run", str(tmp_path / "spec.yaml"), "--stages", "split,vocab,logits,align"])
    assert code == 0, capsys.readouterr().err
    source = models["sources"][0]["name"]
    n_shards = len(json.loads((store / "split" / "_plan.json").read_text())["shards"])
    records = [shards.read_record(Store(str(store)), "align", source, i) for i in range(n_shards)]
    assert all(records) and sum(r["rows"] for r in records) > 0, records
    for record in records:  # target rows with a source distribution
        assert record["rows"] == 0 or record["attrs"]["coverage"] > 0.7, record
