"""Crowd voting for generation: N models each continue a prompt, and the candidate most similar
to all the others wins (a minimum-Bayes-risk choice with the crowd as the evidence).

    score(i) = mean over j != i of sim(candidate_i, candidate_j);  winner = argmax score

Similarities:

    rouge-l-word   ROUGE-L F1 over words (lower-cased word and punctuation tokens)
    rouge-l-char   ROUGE-L F1 over characters
    embedding      cosine of mean-pooled last hidden states of an embedding model (by default
                   the first member; `--embed-model` names another folder)

Candidates are compared as text, so members may have any tokenizers and architectures (unlike
the probability ensemble, fusion/ensemble.py, whose generation needs one vocabulary). Ties go
to the earlier member. Cost: every member generates its whole candidate (N models run per
token, one after another, no shared decoding), then N(N-1)/2 similarities; ROUGE-L is a
longest-common-subsequence table, O(length^2) per pair.

CLI: `fusion vote MODEL... --prompt TEXT [--similarity rouge-l-word] [--max-new-tokens 64]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusion.errors import FusionError

SIMILARITIES = ("rouge-l-word", "rouge-l-char", "embedding")


# ---- similarity -----------------------------------------------------------------------------------
def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (one row of the table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 (precision and recall of the LCS, beta = 1); 0 where either side is empty."""
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def rouge_l_words(candidate: str, reference: str) -> float:
    return rouge_l(words(candidate), words(reference))


def rouge_l_chars(candidate: str, reference: str) -> float:
    return rouge_l(list(candidate), list(reference))


def similarity_matrix(texts: list[str], kind: str, embed: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """sim(i, j) for every pair of texts, symmetric, 1 on the diagonal."""
    n = len(texts)
    if kind == "embedding":
        if embed is None:
            raise FusionError("vote: the embedding similarity needs an embedding model")
        v = np.asarray(embed(texts), dtype=np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v @ v.T
    pair = {"rouge-l-word": rouge_l_words, "rouge-l-char": rouge_l_chars}.get(kind)
    if pair is None:
        raise FusionError(f"vote: unknown similarity {kind!r} (known: {', '.join(SIMILARITIES)})")
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = pair(texts[i], texts[j])
    return sim


def choose(texts: list[str], kind: str, embed=None) -> tuple[int, np.ndarray]:
    """The winning candidate's index and every candidate's mean similarity to the others."""
    if not texts:
        raise FusionError("vote: no candidates")
    if len(texts) == 1:
        return 0, np.zeros(1)
    sim = similarity_matrix(texts, kind, embed)
    scores = (sim.sum(axis=1) - np.diag(sim)) / (len(texts) - 1)
    return int(np.argmax(scores)), scores  # argmax: the first of equals


# ---- members ------------------------------------------------------------------------------------
@dataclass
class Voter:
    name: str
    model: object
    tokenizer: object

    @property
    def context_id(self) -> int:
        for tid in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        raise FusionError(f"vote: member '{self.name}' has neither a BOS nor an EOS token")

    def continue_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                      max_chars: int | None = None) -> str:
        """The member's continuation of `prompt` as text (greedy, or sampled at `temperature`),
        cut to `max_chars` characters if given."""
        import torch

        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 10**9
        ids = [self.context_id, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        ids = ids[-max(1, limit - max_new_tokens):]  # keep the prompt's end where it is too long
        inputs = torch.tensor([ids])
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                      max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                      temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                                      pad_token_id=self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        return text[:max_chars] if max_chars is not None else text

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean of the last hidden states over each text's tokens."""
        import torch

        rows = []
        with torch.inference_mode():
            for text in texts:
                ids = torch.tensor([[self.context_id, *self.tokenizer(text, add_special_tokens=False)["input_ids"]]])
                hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                rows.append(hidden[1:].mean(0).float().numpy() if hidden.shape[0] > 1 else hidden[0].float().numpy())
        return np.stack(rows)


def load_voter(path: str) -> Voter:
    from fusion.ensemble import load_member

    member = load_member(path)
    return Voter(member.name, member.model, member.tokenizer)


def vote(voters: list[Voter], prompt: str, kind: str = "rouge-l-word", max_new_tokens: int = 64,
         temperature: float = 0.0, seed: int = 0, embedder: Voter | None = None, max_chars: int | None = None) -> dict:
    """Every voter's candidate, the scores and the winner (see the module doc)."""
    if kind not in SIMILARITIES:
        raise FusionError(f"vote: unknown similarity {kind!r} (known: {', '.join(SIMILARITIES)})")
    texts = [v.continue_text(prompt, max_new_tokens, temperature, seed, max_chars) for v in voters]
    embed = (embedder or voters[0]).embed if kind == "embedding" else None
    winner, scores = choose(texts, kind, embed)
    return {"winner": winner, "text": texts[winner], "similarity": kind,
            "candidates": [{"model": v.name, "text": t, "score": round(float(s), 6)}
                           for v, t, s in zip(voters, texts, scores)]}


# ---- command line ---------------------------------------------------------------------------------
def add_cli(sub) -> None:
    p = sub.add_parser("vote", help="crowd voting: every model continues the prompt, the most agreed-on candidate wins")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders (any architectures and tokenizers)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--similarity", default="rouge-l-word", choices=SIMILARITIES)
    p.add_argument("--embed-model", metavar="DIR", help="model folder whose hidden states embed the candidates (default: the first model)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--max-chars", type=int, metavar="N", help="cut every candidate to this many characters before voting")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
    p.add_argument("--seed", type=int, default=0, metavar="N")


def run_cli(args) -> int:
    if args.max_new_tokens < 1:
        raise FusionError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    voters = [load_voter(p) for p in args.models]
    embedder = load_voter(args.embed_model) if args.embed_model else None
    result = vote(voters, args.prompt, args.similarity, args.max_new_tokens, args.temperature, args.seed,
                  embedder, args.max_chars)
    print(json.dumps(result, indent=1))
    return 0
