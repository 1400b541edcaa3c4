"""Inference-time probability ensembles: the baseline that fusion distils into one model.

Two kinds, both mixing next-token distributions with weights w_i (normalised to sum 1):

- One vocabulary (`Ensemble`): models that share a tokenizer. The ensemble's distribution over
  the next token is p(x | context) = sum_i w_i p_i(x | context), exact and dense. Every model
  keeps its own KV cache, so generation costs one new position per model and step, and long
  texts are scored `chunk_tokens` positions at a time (only a [batch, chunk, vocab] slice of
  distributions exists at once).
- Different vocabularies (`score_aligned`): members[0] is the base; its tokens define the rows.
  Every other member's top-k distributions are moved onto the base's tokens and vocabulary by
  the default alignment (fusion.align, the same code the align stage runs). Row j mixes the
  base's exact probability of its token t_j with each aligned member's probability of t_j:
  listed mass, or for an unlisted token its row's tail spread evenly over the unlisted ids (the
  fusing module's reading). A member whose alignment gives row j no distribution sits that row
  out: the weights of the members present are renormalised, so every row is a distribution over
  the base vocabulary and the scores are bits of the base's tokens of the text.

  Caveats: aligned rows hold only the member's top-k, so a larger `top_k` is closer to the
  member's real distribution; and which member row serves a base row is decided by both
  tokenizations of the whole block (teacher forcing), so this is scoring, not a causal
  generator. Generation across vocabularies is not supported.

Scores are total NLL per text in nats; `bits_per_byte` (fusion/scoring.py, which also does the
top-k scoring here) turns them into a tokenizer-independent number, as evaluation does.

    from fusion.ensemble import load_member, Ensemble, score_aligned
    members = [load_member("models/a"), load_member("models/b")]
    nll = Ensemble(members).score(token_ids)                 # one vocabulary
    nll = score_aligned(members, texts, top_k=64)            # any vocabularies

CLI: `fusion ensemble score MODEL... --text FILE`, `fusion ensemble generate MODEL... --prompt TEXT`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion import models
from fusion.errors import FusionError
from fusion.scoring import TopK, bits_per_byte, concat, length_batches, score_blocks


@dataclass
class Member:
    """One model of an ensemble with its tokenizer and (unnormalised) weight."""

    name: str
    model: Any
    tokenizer: Any
    weight: float = 1.0

    @property
    def context_id(self) -> int:
        """The token every sequence starts from: BOS, or EOS for models trained without one."""
        return models.context_token_id(self, self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def load_member(path: str | Path, tokenizer: str | Path | None = None, weight: float = 1.0,
                name: str | None = None) -> Member:
    """A Hugging Face model folder (eval mode, on the CPU) and its tokenizer (from `tokenizer`, else the folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FusionError(f"ensemble: {path} is not a model folder (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer or path))
    except Exception as e:  # a broken folder: name it, in one line
        raise FusionError(f"ensemble: cannot load {path} ({type(e).__name__}: {e})") from None
    model = models.load_folder(path, who="ensemble")
    if weight < 0:
        raise FusionError(f"ensemble: weight of {path} is negative ({weight})")
    member = Member(name or path.name, model, tok, weight)
    if len(tok) > model.config.get_text_config().vocab_size:
        raise FusionError(f"ensemble: {path}: tokenizer has {len(tok)} tokens, the model only "
                          f"{model.config.get_text_config().vocab_size} logits")
    return member


def normalised_weights(members: list[Member]) -> np.ndarray:
    w = np.array([m.weight for m in members], dtype=np.float64)
    if len(w) == 0 or w.sum() <= 0:
        raise FusionError("ensemble: needs at least one member with a positive weight")
    return w / w.sum()


def same_vocabulary(members: list[Member]) -> bool:
    """Whether all members' tokenizers map the same strings to the same ids with the same start token."""
    first = members[0]
    return all(m.tokenizer.get_vocab() == first.tokenizer.get_vocab() and m.context_id == first.context_id
               for m in members[1:])


# ---- one vocabulary -----------------------------------------------------------------------------
class Ensemble:
    """The weighted mixture of models that share one tokenizer (see the module doc)."""

    def __init__(self, members: list[Member]):
        if not members:
            raise FusionError("ensemble: no members")
        if not same_vocabulary(members):
            raise FusionError("ensemble: members have different vocabularies; use score_aligned for those")
        self.members = members
        self.weights = normalised_weights(members)
        self.vocab_size = members[0].vocab_size
        self.context_id = members[0].context_id

    def log_mixture(self, input_ids, attention_mask=None, caches=None):
        """log sum_i w_i p_i(. | inputs) at every input position, [B, T, V] float32, and the
        members' updated KV caches (pass them back in to continue the same sequences)."""
        import torch

        caches = caches or [None] * len(self.members)
        parts, new_caches = [], []
        with torch.inference_mode():
            for m, w, cache in zip(self.members, self.weights, caches):
                if w == 0:
                    new_caches.append(None)
                    continue
                out = m.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
                logp = torch.log_softmax(out.logits[..., : self.vocab_size].float(), dim=-1)
                parts.append(logp + math.log(w))
                new_caches.append(out.past_key_values)
        return torch.logsumexp(torch.stack(parts), dim=0), new_caches

    def score(self, token_ids: list[list[int]], chunk_tokens: int = 512, batch_tokens: int = 16384) -> np.ndarray:
        """Total NLL (nats, float64) of each token sequence, every token predicted from the
        start token and the tokens before it."""
        import torch

        out = np.zeros(len(token_ids), dtype=np.float64)
        for batch in length_batches([len(ids) for ids in token_ids], batch_tokens):
            width = max(len(token_ids[i]) for i in batch) + 1
            inputs = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(inputs)
            for r, i in enumerate(batch):
                inputs[r, 0] = self.context_id
                inputs[r, 1 : len(token_ids[i]) + 1] = torch.tensor(token_ids[i], dtype=torch.long)
                mask[r, : len(token_ids[i]) + 1] = 1
            total = torch.zeros(len(batch), dtype=torch.float64)
            caches = None
            for a in range(0, width - 1, chunk_tokens):  # positions a..b-1 predict tokens a+1..b
                b = min(a + chunk_tokens, width - 1)
                logmix, caches = self.log_mixture(inputs[:, a:b], mask[:, :b], caches)
                labels = inputs[:, a + 1 : b + 1]
                lp = logmix.gather(-1, labels[..., None]).squeeze(-1).double()
                total -= (lp * mask[:, a + 1 : b + 1]).sum(-1)
            out[batch] = total.numpy()
        return out

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop_at_eos: bool = True) -> list[int]:
        """New token ids after the prompt: greedy (temperature 0) or sampled from the mixture
        (its log-probabilities divided by the temperature)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        eos = self.members[0].tokenizer.eos_token_id
        inputs = torch.tensor([[self.context_id, *prompt_ids]], dtype=torch.long)
        new, caches = [], None
        for _ in range(max_new_tokens):
            logmix, caches = self.log_mixture(inputs, None, caches)
            last = logmix[0, -1]
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen))
            else:
                token = int(torch.argmax(last))
            new.append(token)
            if stop_at_eos and token == eos:
                break
            inputs = torch.tensor([[token]], dtype=torch.long)
        return new


# ---- different vocabularies -----------------------------------------------------------------------
def _member_rows(member: Member, token_ids: list[list[int]], top_k: int, batch_tokens: int):
    """The member's own rows on its tokens: flat tokens, offsets, top-k ids / log-probs, tail, NLL."""
    k = min(top_k, member.vocab_size)
    results = score_blocks(TopK(member.model, k, "cpu"), token_ids, member.context_id, batch_tokens)
    ptr = np.zeros(len(token_ids) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in token_ids], out=ptr[1:])
    flat = np.array([t for ids in token_ids for t in ids], dtype=np.int64)
    rows = [concat(results, 0, (0, k), np.int64), concat(results, 1, (0, k), np.float32)]
    return flat, ptr, *rows, concat(results, 2, (0,), np.float32), concat(results, 3, (0,), np.float64)


def score_aligned(members: list[Member], texts: list[str], top_k: int = 64, batch_tokens: int = 16384,
                  stats: dict | None = None) -> np.ndarray:
    """Total NLL (nats, float64) of each text under the mixture on members[0]'s tokens, the
    others aligned onto them (see the module doc). Each text must fit every member's context.
    Pass a dict as `stats` to get each aligned member's coverage (share of rows it served)."""
    from fusion.align import align_blocks, token_view
    from fusion.align.modes import DEFAULT
    from fusion.fusing import token_nll

    if not members:
        raise FusionError("ensemble: no members")
    if not 1 <= top_k <= 255:
        raise FusionError(f"ensemble: top_k must be 1..255, got {top_k}")
    weights = normalised_weights(members)
    base = members[0]
    ids = [m.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [] for m in members]
    b_tokens, b_ptr, _, _, _, b_nll = _member_rows(base, ids[0], 1, batch_tokens)
    numerator = weights[0] * np.exp(-b_nll)
    denominator = np.full(len(b_tokens), weights[0])
    base_view = token_view(base.tokenizer)
    for i, (m, w) in enumerate(zip(members, weights)):
        if i == 0 or w == 0:
            continue
        s_tokens, s_ptr, topk_ids, topk_lp, tail, _ = _member_rows(m, ids[i], top_k, batch_tokens)
        rows = align_blocks(texts, b_tokens, b_ptr, s_tokens, s_ptr, topk_ids, topk_lp, tail,
                            base_view, token_view(m.tokenizer), None, DEFAULT)
        present = rows.counts > 0
        with np.errstate(over="ignore"):
            p = np.exp(-token_nll(rows, b_tokens, base.vocab_size, outside="tail"))
        numerator += np.where(present, w * p, 0.0)
        denominator += np.where(present, w, 0.0)
        if stats is not None:
            stats[m.name if m.name not in stats else f"{m.name} ({i})"] = {
                "coverage": float(present.mean()) if len(present) else 1.0}
    with np.errstate(divide="ignore"):
        row_nll = -np.log(numerator / denominator)
    return np.array([row_nll[a:b].sum() for a, b in zip(b_ptr[:-1], b_ptr[1:])], dtype=np.float64)


def score_texts(members: list[Member], texts: list[str], top_k: int = 64, batch_tokens: int = 16384) -> np.ndarray:
    """Total NLL per text: exact (`Ensemble.score`) where the members share a vocabulary, else aligned."""
    if same_vocabulary(members):
        tok = members[0].tokenizer
        return Ensemble(members).score(tok(texts, add_special_tokens=False)["input_ids"] if texts else [],
                                       batch_tokens=batch_tokens)
    return score_aligned(members, texts, top_k, batch_tokens)


# ---- command line ---------------------------------------------------------------------------------
def add_cli(sub) -> None:
    """`fusion ensemble score|generate` (called by fusion/cli.py)."""
    p = sub.add_parser("ensemble", help="probability ensembles of models at inference: score text, generate")
    esub = p.add_subparsers(dest="ensemble_command", required=True)
    s = esub.add_parser("score", help="bits per byte of text files under the ensemble (any vocabularies)")
    s.add_argument("models", nargs="+", metavar="MODEL", help="model folders (with their tokenizers); the first is the base")
    s.add_argument("--text", action="append", required=True, metavar="FILE", help="UTF-8 text file (repeatable)")
    s.add_argument("--weights", metavar="W,...", help="comma-separated member weights (default: equal)")
    s.add_argument("--block-tokens", type=int, default=512, metavar="N", help="text is cut into blocks of at most this many tokens")
    s.add_argument("--top-k", type=int, default=64, metavar="K", help="entries kept per aligned row (different vocabularies)")
    g = esub.add_parser("generate", help="continue a prompt from the ensemble (one vocabulary)")
    g.add_argument("models", nargs="+", metavar="MODEL", help="model folders that share one tokenizer")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    g.add_argument("--weights", metavar="W,...", help="comma-separated member weights (default: equal)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed")


def _members(args) -> list[Member]:
    weights = [1.0] * len(args.models)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise FusionError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
        if len(weights) != len(args.models):
            raise FusionError(f"--weights: {len(weights)} weights for {len(args.models)} models")
    return [load_member(path, weight=w) for path, w in zip(args.models, weights)]


def run_cli(args) -> int:
    from fusion.corpus import split_text

    members = _members(args)
    if args.ensemble_command == "generate":
        ensemble = Ensemble(members)
        tok = members[0].tokenizer
        new = ensemble.generate(tok(args.prompt, add_special_tokens=False)["input_ids"], args.max_new_tokens,
                                args.temperature, args.seed)
        print(args.prompt + tok.decode(new, skip_special_tokens=True))
        return 0
    longest = min(getattr(m.model.config.get_text_config(), "max_position_embeddings", None)
                  or getattr(m.model.config, "n_positions", 10**9) for m in members)
    block = min(args.block_tokens, longest - 1)
    texts = []
    for path in args.text:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FusionError(f"--text {path}: cannot read UTF-8 text ({e})") from None
        texts += split_text(text, [m.tokenizer for m in members], block)
    if not texts:
        raise FusionError("ensemble score: the text files hold no text")
    nll = score_texts(members, texts, args.top_k)
    print(json.dumps({
        "bits_per_byte": round(bits_per_byte(nll, texts), 6),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "blocks": len(texts),
        "same_vocabulary": same_vocabulary(members),
        "members": [{"model": str(p), "weight": float(w)} for p, w in zip(args.models, normalised_weights(members))],
    }))
    return 0
