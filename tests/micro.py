"""A micro fusion run for tests: small models from transformers configs with tokenizers trained
here, and a corpus from this Python's standard library, all built in seconds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from fusion import tiny
from fusion.config import set_key


@dataclass
class Micro:
    root: Path
    models: dict[str, Path]
    corpus: Path

    def spec(self, store: Path | str, **overrides) -> dict:
        spec = {
            "name": "micro",
            "store": str(store),
            "models": {
                "target": {"name": "target", "path": str(self.models["target"])},
                "sources": [
                    {"name": "src-llama", "path": str(self.models["src-llama"])},
                    {"name": "src-neox", "path": str(self.models["src-neox"])},
                ],
            },
            "corpus": {"path": str(self.corpus), "heldout_fraction": 0.2, "domain_field": "domain"},
            "split": {"block_tokens": 64, "shard_blocks": 24},
            "logits": {"top_k": 8, "batch_tokens": 2048},
            "fuse": {"top_k": 8},
            "train": {"batch_size": 8, "lr": 3e-3, "epochs": 1, "checkpoint_every": 3, "warmup_steps": 2},
            "eval": {"max_blocks": 40},
        }
        for key, value in overrides.items():
            set_key(spec, key, value)
        return spec

    def write_spec(self, path: Path, store: Path | str, **overrides) -> Path:
        path.write_text(yaml.safe_dump(self.spec(store, **overrides), sort_keys=False))
        return path


def build_micro(root: Path) -> Micro:
    texts = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:60])]
    models = {}
    for name, (arch, kind, vocab, seed) in {
        "target": ("llama", "sentencepiece", 600, 0),
        "src-llama": ("llama", "sentencepiece", 500, 1),
        "src-neox": ("gpt_neox", "byte-level", 500, 2),
    }.items():
        tok = tiny.train_tokenizer(kind, texts[seed::3], vocab)
        model = tiny.make_model(arch, len(tok), hidden=32, layers=1, tokenizer=tok, seed=seed)
        tiny.pretrain(model, tok, texts[seed::3][:10], steps=15, batch=8, seed=seed, progress=f"micro {name}")
        models[name] = root / name
        model.save_pretrained(models[name])
        tok.save_pretrained(models[name])
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text, domain in list(tiny.corpus_documents("python-stdlib"))[:24]:
            f.write(json.dumps({"text": text[:6000], "domain": domain}) + "\n")
    return Micro(root, models, corpus)
