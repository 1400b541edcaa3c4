"""Token alignment and vocabulary mapping between tokenizers (FuseLLM's steps 2 and 3).

    view = token_view(tokenizer)                       # what each id stands for (tokens.py)
    table = vocab_map(source_view, target_view, mode)  # source id -> target id (vocab.py)
    rows = align_blocks(texts, target_tokens, target_ptr, source_tokens, source_ptr,
                        source_topk_ids, source_topk_logprobs, source_tail,
                        target_view, source_view, table, mode)   # SparseRows on target rows

Modes (modes.py: each `align.mode` resolved once into a Mode with its table and kernel):
"default" (default.py: shared text boundaries, bytes, next-token fallback, tail kept),
"reference-hard" / "reference-soft" (reference.py: the paper's DTW alignment, exactly).

Modules, in reading order: tokens.py (views), streams.py (where tokens sit in the text), vocab.py
(maps, on-disk cache), dtw.py (the paper's DTW, banded and certified), reference.py, default.py,
modes.py (the modes: which map and kernel each uses), blocks.py (align_blocks, align_blocks_parallel), fixture.py (the alignment-fixture runner).
"""

from .blocks import align_blocks, align_blocks_parallel, coverage
from .streams import check_placeable
from .tokens import TokenView, content_hash, token_view
from .modes import MODES, Mode, resolve, vocab_map


def align_fixture(fixture_dir, mode: "str | Mode", out_path) -> dict:
    """See fusion/align/fixture.py (imported on use, so that `python -m fusion.align.fixture` runs cleanly)."""
    from .fixture import align_fixture as run

    return run(fixture_dir, mode, out_path)


__all__ = ["MODES", "Mode", "TokenView", "align_blocks", "align_blocks_parallel", "align_fixture", "check_placeable",
           "content_hash", "coverage", "resolve", "token_view", "vocab_map"]
