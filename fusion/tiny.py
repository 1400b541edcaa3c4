"""The built-in tiny example: a corpus, tokenizers and models made from this Python installation.

`tiny:python-stdlib` is a corpus of the standard library's top-level modules, each giving two
documents: its docstrings ("prose") and its code without them ("code"). The tiny models are
trained on the standard library's packages instead (email/, json/, asyncio/, ...), so the
fusion corpus is text none of them has seen:

    src-llama   Llama architecture, SentencePiece-style BPE (`▁`, byte fallback), trained on prose
    src-neox    GPT-NeoX architecture, byte-level BPE (`Ġ`), trained on code
    target      Llama architecture, its own SentencePiece-style vocabulary, briefly trained on both

Models are built once and cached under $FUSION_CACHE_DIR (default ~/.cache/fusion), keyed by
the recipe and the library versions, so a second run reuses them.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import FusionError

RECIPE_VERSION = 2
SPECIAL_SP = ["<unk>", "<s>", "</s>"]
SPECIAL_BYTE_LEVEL = ["<|endoftext|>"]


@dataclass(frozen=True)
class TinyRecipe:
    architecture: str  # "llama" | "gpt_neox"
    tokenizer: str  # "sentencepiece" | "byte-level"
    vocab_size: int
    domains: tuple[str, ...]  # what it is trained on
    steps: int
    hidden: int = 128
    layers: int = 3


RECIPES = {
    "src-llama": TinyRecipe("llama", "sentencepiece", 2048, ("prose",), steps=500),
    "src-neox": TinyRecipe("gpt_neox", "byte-level", 2048, ("code",), steps=500),
    "target": TinyRecipe("llama", "sentencepiece", 3072, ("prose", "code"), steps=120, layers=2),
}
BLOCK = 128  # tokens per pretraining sequence


def cache_dir() -> Path:
    return Path(os.environ.get("FUSION_CACHE_DIR", Path.home() / ".cache" / "fusion")).expanduser()


# ---- the corpus -------------------------------------------------------------------------------
def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_module(source: str) -> tuple[str, str]:
    """A module's docstrings and its code with the docstring lines removed."""
    tree = ast.parse(source)
    docs, drop = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    docs.append(ast.get_docstring(node, clean=True) or "")
                    drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines(keepends=True)
    code = "".join(line for n, line in enumerate(lines, 1) if n not in drop)
    return "\n\n".join(d for d in docs if d.strip()), code


def _module_files(packages: bool) -> list[Path]:
    root = _stdlib()
    if not packages:
        return sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "tkinter"}
    return sorted(
        p for p in root.glob("*/**/*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)
    )


def _documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            prose, code = _split_module(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if prose.strip():
            yield prose, "prose"
        if code.strip():
            yield code, "code"


def corpus_documents(name: str) -> Iterator[tuple[str, str]]:
    if name != "python-stdlib":
        raise FusionError(f"corpus.path: unknown built-in corpus tiny:{name} (known: tiny:python-stdlib)")
    yield from _documents(_module_files(packages=False))


def _training_texts(domains: tuple[str, ...], max_chars: int = 3_000_000) -> list[str]:
    texts, total = [], 0
    for text, domain in _documents(_module_files(packages=True)):
        if domain in domains and total < max_chars:
            texts.append(text)
            total += len(text)
    return texts


# ---- tokenizers -------------------------------------------------------------------------------
def train_tokenizer(kind: str, texts: list[str], vocab_size: int):
    """A fast tokenizer of one of the two families most open LLMs use, trained on texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 256, special_tokens=SPECIAL_SP, limit_alphabet=200, show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        tok = _with_byte_pieces(tok)
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_BYTE_LEVEL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    raise ValueError(f"unknown tokenizer kind {kind}")


def _with_byte_pieces(tok):
    """Put the 256 byte-fallback pieces <0x00>..<0xFF> into the vocabulary right after the
    special tokens, as SentencePiece models do (ordinary tokens, not special added tokens)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials = sorted((i, t) for t, i in vocab.items() if t in SPECIAL_SP)
    learned = sorted((i, t) for t, i in vocab.items() if t not in SPECIAL_SP)
    order = [t for _, t in specials] + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


# ---- models -----------------------------------------------------------------------------------
def make_model(architecture: str, vocab_size: int, hidden: int, layers: int, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of the given architecture (transformers config):
    "llama", "gpt_neox" or "gpt2"."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 3,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if architecture == "llama":
        config = LlamaConfig(num_key_value_heads=2, **common)
    elif architecture == "gpt_neox":
        config = GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common)
    elif architecture == "gpt2":  # learned positions, LayerNorm, GELU MLP; GPT-2's own key names
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_inner=hidden * 3,
            n_positions=common["max_position_embeddings"], bos_token_id=common["bos_token_id"],
            eos_token_id=common["eos_token_id"], tie_word_embeddings=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout, like the other two
        )
    else:
        raise ValueError(f"unknown architecture {architecture}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0, progress: str = "pretraining"):
    """Plain next-token training on BLOCK-token windows of texts, each starting with BOS."""
    import numpy as np
    import torch

    from fusion.progress import bar

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    ids = np.array(ids, dtype=np.int64)
    n_windows = len(ids) // BLOCK
    if n_windows < batch:
        raise FusionError(f"tiny model pretraining: only {n_windows} windows of text")
    windows = torch.from_numpy(ids[: n_windows * BLOCK].reshape(n_windows, BLOCK))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    for _ in bar(range(steps), desc=progress, leave=False):
        rows = windows[torch.randint(n_windows, (batch,), generator=gen)]
        inputs = torch.cat([torch.full((batch, 1), bos), rows], dim=1)
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def _cache_key() -> str:
    import tokenizers
    import torch
    import transformers

    blob = repr((RECIPE_VERSION, sorted(RECIPES.items()), sys.version_info[:2], torch.__version__, transformers.__version__, tokenizers.__version__))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def built_path(name: str) -> Path:
    """The folder of built-in tiny model NAME once built (model_path builds it); nothing is built here."""
    if name not in RECIPES:
        raise FusionError(f"unknown built-in model tiny:{name} (known: {', '.join('tiny:' + n for n in RECIPES)})")
    return cache_dir() / "tiny" / _cache_key() / name


def model_path(name: str) -> Path:
    """The folder of built-in tiny model NAME, built on first use."""
    final = built_path(name)
    if (final / "config.json").exists():
        return final
    import torch

    recipe = RECIPES[name]
    texts = _training_texts(recipe.domains)
    tokenizer = train_tokenizer(recipe.tokenizer, texts, recipe.vocab_size)
    model = make_model(recipe.architecture, len(tokenizer), recipe.hidden, recipe.layers, tokenizer)
    threads = torch.get_num_threads()
    try:
        pretrain(model, tokenizer, texts, recipe.steps, progress=f"building tiny:{name}")
    finally:
        torch.set_num_threads(threads)
    tmp = final.parent / f".{name}.tmp-{uuid.uuid4().hex}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(final)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return final
