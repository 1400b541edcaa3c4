"""Real text with real tokenizers, for measurements that depend on the distributions' entropy.

The tokenizers and corpora come from ../shared/assets (next to the repository). The models are
tiny Llama transformers with those real vocabularies, briefly trained (`STEPS` steps) on the
first part of both corpora; the fusion corpus is text from the later part that none has seen.
Their distributions are flatter than a real LLM's (higher entropy), which makes compression
harder, not easier, for the log-probs; the ids of a briefly trained model concentrate on
frequent tokens, which makes them easier. `stories260K` (a real, fully trained 512-token
model) is the cross-check with real entropy.

Models are cached under $FUSION_CACHE_DIR/realtext/ and built once (a few minutes each).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
STEPS = 300
TRAIN_CHARS = 2_000_000  # per corpus, from its start
MODELS = {  # name: (tokenizer asset, seed)
    "target": ("tok-llama2", 0),
    "src-neox": ("tok-gpt-neox-20b", 1),
    "src-gpt2": ("tok-gpt2", 2),
    "src-openllama": ("tok-openllama-v1", 3),
    "src-mistral": ("tok-mistral-7b-v0.1", 4),
    "src-qwen3": ("tok-qwen3", 5),
}


def corpora() -> dict[str, str]:
    if not ASSETS.is_dir():
        raise SystemExit(f"{ASSETS} is not present: these measurements need the shared assets")
    return {
        "sotu": (ASSETS / "corpus-sotu-en" / "sotu.txt").read_text(encoding="utf-8"),
        "docs": (ASSETS / "corpus-python311-docs-en" / "python311_docs.txt").read_text(encoding="utf-8"),
    }


def tokenizer(asset: str):
    """The asset's tokenizer.json as a fast tokenizer (never a slow class: see DESIGN §8)."""
    from transformers import PreTrainedTokenizerFast

    folder = ASSETS / asset
    config = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if isinstance(config.get(k), str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)


def model_folder(name: str) -> Path:
    """A tiny Llama with the real tokenizer of MODELS[name], built and trained once."""
    from fusion import tiny

    asset, seed = MODELS[name]
    root = Path(os.environ.get("FUSION_CACHE_DIR", Path.home() / ".cache" / "fusion")).expanduser()
    final = root / "realtext" / f"v1-{STEPS}" / name
    if (final / "config.json").exists():
        return final
    tok = tokenizer(asset)
    texts = []
    for text in corpora().values():
        head = text[:TRAIN_CHARS]
        texts += [head[i : i + 20_000] for i in range(0, len(head), 20_000)]
    model = tiny.make_model("llama", len(tok), hidden=128, layers=2, tokenizer=tok, seed=seed)
    model.config.max_position_embeddings = 4096
    tiny.pretrain(model, tok, texts, STEPS, batch=8, lr=3e-3, seed=seed, progress=f"realtext {name}")
    tmp = final.parent / f".{name}.tmp-{uuid.uuid4().hex}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_corpus(path: Path, chars_per_domain: int) -> Path:
    """Held-out real text: documents from the end of both corpora, as jsonl with a domain."""
    with open(path, "w") as f:
        for domain, text in corpora().items():
            tail = text[len(text) - chars_per_domain :]
            for i in range(0, len(tail), 50_000):
                f.write(json.dumps({"text": tail[i : i + 50_000], "domain": domain}) + "\n")
    return path


def spec(store: str, corpus: Path, sources: list[str], block_tokens: int = 2048, top_k: int = 10,
         continuations: int = 4) -> dict:
    return {
        "name": "realtext",
        "store": store,
        "models": {
            "target": {"name": "target", "path": str(model_folder("target"))},
            "sources": [{"name": s, "path": str(model_folder(s))} for s in sources],
        },
        "corpus": {"path": str(corpus), "domain_field": "domain", "heldout_fraction": 0.0},
        "split": {"block_tokens": block_tokens, "shard_blocks": 64},
        "logits": {"top_k": top_k, "continuations": continuations, "batch_tokens": 16384},
        "fuse": {"top_k": top_k},
    }
