"""split: the corpus as text blocks that every source's tokenizer turns into at most
`split.block_tokens` tokens, so that all models see exactly the same text. The target's
tokenizer plays no part, so that one capture of the sources serves many targets
(fusion/capture.py); the target's tokens of a block may exceed block_tokens (by the ratio of
the tokenizers; fusion/corpus.py's FILL leaves 10 % of room) up to its own context length.

Text is normalised to Unicode NFC first (several tokenizers normalise, and every model must
see the same text). A plan (one pass over the corpus, no tokenizing) groups consecutive
documents into shards by size and marks whole documents as held out; each shard task then
cuts its documents into blocks (`split_text`, fusion/corpus.py) and writes two parts: `train`
(what the logits stage reads) and `heldout` (what evaluation reads). Blocks end at a line
break or a space where one is near.

Arrays per part and shard: text (uint8, the blocks' UTF-8 bytes back to back), text_ptr
(int64 [blocks+1]), doc (int64 [blocks], document index), domain (uint8 [blocks], index into
the plan's domain list).
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata

import numpy as np

from fusion import shards
from fusion.corpus import read_documents, split_text
from fusion.errors import FusionError
from fusion.run import Run
from fusion.stages import Stage

NAME = "split"
PARTS = ["train", "heldout"]
PLAN = "split/_plan.json"
CHARS_PER_TOKEN = 3  # only for sizing shards; blocks are cut by real token counts


def parts(run: Run) -> list[str]:
    return PARTS


def inputs(run: Run, part: str) -> list[tuple[str, str]]:
    return []


def fingerprint(run: Run, part: str) -> dict:
    return {
        "corpus": run.spec.corpus.model_dump(mode="json"),
        "split": run.spec.split.model_dump(mode="json"),
        "tokenizers": [run.tokenizer_hash(m.name) for m in run.sources],  # not the target's: fusion/capture.py
    }


def is_heldout(doc_index: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"heldout:{doc_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def plan(run: Run) -> dict:
    """The shard plan, made once and stored; a plan of another config is an error."""
    config_hash = run.hash(NAME, "train")
    existing = run.store.read_json(PLAN)
    if existing is not None:
        if existing["config_hash"] != config_hash:
            raise FusionError(
                f"{run.store.uri(PLAN)} was made with config hash {existing['config_hash']}, this run's is "
                f"{config_hash}: corpus or split settings changed; use a new store or --redo split"
            )
        return existing
    spec = run.spec
    budget = spec.split.shard_blocks * spec.split.block_tokens * CHARS_PER_TOKEN
    shard_ranges, domains, start, size, n = [], {}, 0, 0, 0
    fraction = spec.corpus.heldout_fraction
    heldout = train = with_text = 0
    for n, (text, domain) in enumerate(read_documents(spec.corpus)):
        domains.setdefault(domain, len(domains))
        size += len(text)
        if text.strip():
            with_text += 1
            if is_heldout(n, fraction):
                heldout += 1
            else:
                train += 1
        if size >= budget:
            shard_ranges.append([start, n + 1])
            start, size = n + 1, 0
    else:
        n += 1
    if with_text == 0:
        raise FusionError(f"corpus.path: {spec.corpus.path} holds no text (empty corpus)")
    if train == 0:
        raise FusionError(
            f"corpus.path: {spec.corpus.path}: all {with_text} document(s) with text went to held-out evaluation "
            f"(corpus.heldout_fraction={fraction:g} draws each document by a hash of its index), none is left to "
            f"train on; add documents, or lower corpus.heldout_fraction (0 trains on all, leaving eval nothing)"
        )
    if heldout == 0 and fraction > 0:  # found here, not after training, when eval has nothing to score
        raise FusionError(
            f"corpus.path: {spec.corpus.path}: no document went to held-out evaluation ({with_text} document(s) "
            f"with text, corpus.heldout_fraction={fraction:g}); add documents or raise corpus.heldout_fraction"
        )
    if start < n:
        shard_ranges.append([start, n])
    if len(domains) > 255:
        raise FusionError(f"corpus: {len(domains)} domains; at most 255 are supported")
    result = {
        "config_hash": config_hash,
        "documents": n,
        "train_documents": train,
        "heldout_documents": heldout,
        "domains": sorted(domains, key=domains.get),
        "shards": shard_ranges,
    }
    run.store.write_json(PLAN, result, exclusive=True)
    return run.store.read_json(PLAN)


def shard_count(run: Run, part: str) -> int:
    return len(plan(run)["shards"])


def run_shard(run: Run, part: str, index: int) -> None:
    """Writes both parts of shard `index` (the `part` argument only names which one was asked)."""
    the_plan = plan(run)
    start, stop = the_plan["shards"][index]
    domain_index = {d: i for i, d in enumerate(the_plan["domains"])}
    tokenizers = [run.tokenizers[m.name] for m in run.sources]
    fraction = run.spec.corpus.heldout_fraction
    blocks = {p: ([], [], []) for p in PARTS}  # texts, docs, domains
    docs = itertools.islice(read_documents(run.spec.corpus), start, stop)
    for doc, (text, domain) in enumerate(docs, start):
        text = unicodedata.normalize("NFC", text)
        target = blocks["heldout" if is_heldout(doc, fraction) else "train"]
        for block in split_text(text, tokenizers, run.spec.split.block_tokens):
            target[0].append(block)
            target[1].append(doc)
            target[2].append(domain_index[domain])
    for p in ("heldout", "train"):  # train last: its record marks the task done
        texts, docs_, domains = blocks[p]
        encoded = [t.encode("utf-8") for t in texts]
        ptr = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=ptr[1:])
        arrays = {
            "text": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            "text_ptr": ptr,
            "doc": np.array(docs_, dtype=np.int64),
            "domain": np.array(domains, dtype=np.uint8),
        }
        shards.write_shard(run.store, NAME, p, index, arrays, run.hash(NAME, p), rows=len(texts))


def is_done(run: Run, part: str, index: int) -> bool:
    return all(shards.read_record(run.store, NAME, p, index, run.hash(NAME, p)) for p in PARTS)


def read_blocks(run: Run, part: str, index: int) -> tuple[list[str], dict[str, np.ndarray]]:
    arrays = shards.read_shard(run.store, NAME, part, index)
    blob, ptr = arrays["text"].tobytes(), arrays["text_ptr"]
    texts = [blob[ptr[i] : ptr[i + 1]].decode("utf-8") for i in range(len(ptr) - 1)]
    return texts, arrays


STAGE = Stage(NAME, parts, inputs, fingerprint, shard_count, run_shard, plan=plan, is_done=is_done,
              stored_per="byte of text")
