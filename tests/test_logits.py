"""The logits stage and its scoring (fusion/scoring.py): top-k on the device equals a plain full-vocabulary computation, the stored
arrays round-trip, and the NLL that is not stored is exactly derivable."""

import numpy as np
import pytest
import torch

from fusion import encoding, scoring
from fusion.stages import logits


def reference_rows(full_logits: torch.Tensor, targets: torch.Tensor, k: int):
    lp = torch.log_softmax(full_logits.float(), dim=-1)
    order = np.lexsort((np.arange(lp.shape[1])[None].repeat(lp.shape[0], 0), -lp.numpy()), axis=1)[:, :k]
    ids = torch.from_numpy(order)
    top = lp.gather(-1, ids)
    nll = -lp.gather(-1, targets[:, None]).squeeze(-1)
    return ids, top, nll


@pytest.mark.parametrize("vocab", [50, 5000, 50277])
def test_top_k_rows_match_a_full_sort(vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(64, vocab, generator=gen) * 4
    x[0, 3:9] = 20.0  # ties within the top-k are ordered by id
    targets = torch.randint(vocab, (64,), generator=gen)
    ids, lp, tail, nll = scoring.top_k_rows(x, targets, 10)
    ref_ids, ref_lp, ref_nll = reference_rows(x, targets, 10)
    assert torch.equal(ids.long(), ref_ids)
    assert torch.allclose(lp.float(), ref_lp, rtol=1e-3, atol=2e-3) and torch.allclose(nll, ref_nll, atol=1e-4)
    assert torch.allclose(tail.float(), 1 - ref_lp.exp().sum(-1), atol=2e-3)


def test_scorer_matches_the_plain_forward(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(micro.models["src-neox"])).eval()
    tok = AutoTokenizer.from_pretrained(str(micro.models["src-neox"]))
    texts = [micro.corpus.read_text()[i * 300 : i * 300 + 100 + 37 * i] for i in range(5)]
    blocks = tok(texts, add_special_tokens=False)["input_ids"]
    scorer = scoring.TopK(model, 8, "cpu")
    assert scorer.split_head
    bos = tok.bos_token_id
    for block, (ids, lp, tail, nll) in zip(blocks, scorer(blocks, bos)):
        with torch.inference_mode():
            full = model(input_ids=torch.tensor([[bos] + block])).logits[0, :-1]
        ref_ids, ref_lp, ref_nll = reference_rows(full, torch.tensor(block), 8)
        assert np.array_equal(ids, ref_ids.numpy())
        assert np.allclose(lp.astype(np.float32), ref_lp.numpy(), rtol=1e-3, atol=2e-3)
        assert np.allclose(nll, ref_nll.numpy(), atol=1e-4)
        # the NLL of a listed real token is minus its log-prob, bit for bit in float16
        hit = ids == np.array(block)[:, None]
        rows_hit = hit.any(1)
        assert np.array_equal((-lp[hit]).view(np.uint16), nll[rows_hit].astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("m", [0, 3])
def test_pack_and_decode_give_back_what_was_computed(micro, m):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.align import token_view
    from fusion.continuations import prefix_ranges

    model = AutoModelForCausalLM.from_pretrained(str(micro.models["target"])).eval()
    tok = AutoTokenizer.from_pretrained(str(micro.models["target"]))
    texts = [micro.corpus.read_text()[i * 500 : i * 500 + 200] for i in range(6)]
    blocks = tok(texts, add_special_tokens=False)["input_ids"]
    continuations = (prefix_ranges(token_view(tok)), m) if m else None
    results = scoring.TopK(model, 8, "cpu", continuations)(blocks, tok.bos_token_id)
    stored = logits.pack(blocks, results, [len(t.encode()) for t in texts], model.config.vocab_size, 8, m=m)
    names = [n for n in logits.NEEDS if m or not n.startswith("cont_")]
    back = logits.decode(stored, names, 8)
    if m:
        depths = np.concatenate([r[4] for r in results])
        assert np.array_equal(back["cont_depth"], depths) and depths.sum() > 0
        ids = np.concatenate([r[5] for r in results])
        listed = ids >= 0
        assert np.array_equal(back["cont_counts"], listed.sum(1))
        assert np.array_equal(back["cont_ids"], ids[listed])
        computed = np.concatenate([r[6] for r in results])[listed]
        assert np.array_equal(back["cont_logprobs"].view(np.uint16), computed.view(np.uint16))
        assert np.array_equal(back["cont_tail"], np.concatenate([r[7] for r in results]))
    assert np.array_equal(back["tokens"], np.concatenate(blocks))
    assert np.array_equal(back["seq_ptr"], encoding.row_ptr(np.array([len(b) for b in blocks])))
    assert np.array_equal(back["topk_ids"], np.concatenate([r[0] for r in results]))
    computed_lp = np.concatenate([r[1] for r in results])
    assert np.array_equal(back["topk_logprobs"].view(np.uint16), computed_lp.view(np.uint16))
    assert np.array_equal(back["tail"], np.concatenate([r[2] for r in results]))
    nll = np.concatenate([r[3] for r in results])
    assert np.array_equal(back["nll"].view(np.uint16), nll.astype(np.float16).view(np.uint16))
    assert np.allclose(back["seq_nll"], [r[3].sum() for r in results], rtol=1e-6)


def test_length_batches_cover_every_block_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    batches = scoring.length_batches(lengths, 2048)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert (max(lengths[i] for i in b) + 1) * len(b) <= 2048 or len(b) == 1
    padded = sum((max(lengths[i] for i in b) + 1) * len(b) for b in batches)
    assert padded / sum(n + 1 for n in lengths) < 1.05  # sorted by length: little padding


# ---- sampled rows (logits.method: sampled) ---------------------------------------------------------
def inclusion_probabilities(p: np.ndarray, k: int) -> np.ndarray:
    """The chance that each token is in a row of k sampled entries, worked out here on its own:
    the most probable tokens are kept while k' p_i exceeds the rest's mass R, the others are
    drawn with probability k' p_i / R."""
    order = np.argsort(-p)
    kept = 0
    while kept < k and (k - kept) * p[order[kept]] > p[order[kept:]].sum():
        kept += 1
    pi = np.ones_like(p)
    rest = order[kept:]
    pi[rest] = (k - kept) * p[rest] / p[rest].sum()
    return pi


def renormalized_top_k(logits: torch.Tensor, targets: torch.Tensor, k: int, uniforms=None):
    ids, lp, tail, nll = scoring.top_k_rows(logits, targets, k)
    lp = lp.float() - lp.float().exp().sum(-1, keepdim=True).log()
    return ids, lp.half(), torch.zeros_like(tail), nll


@pytest.mark.parametrize("rows_of", [scoring.sampled_rows, renormalized_top_k])
def test_sampled_rows_estimate_the_distribution_without_bias(rows_of):
    """The mean of many sampled rows converges to the model's distribution, token by token within
    5 standard deviations of the estimator (plus float16 rounding); renormalised top-k, stored in
    the same k entries, cannot meet the same bound."""
    vocab, k, n = 64, 8, 20_000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 1.5
    p = torch.softmax(logits.double(), -1)[0].numpy()
    uniforms = torch.from_numpy(np.random.default_rng(1).random(n))
    ids, lp, tail, _ = rows_of(logits.expand(n, vocab).contiguous(), torch.zeros(n, dtype=torch.long), k, uniforms)
    mean = np.bincount(ids.reshape(-1).numpy(), weights=lp.reshape(-1).double().exp().numpy(), minlength=vocab) / n
    pi = inclusion_probabilities(p, k)
    assert pi.min() < 0.5 and p[pi < 1].sum() > 0.3  # most of the mass is sampled, not kept
    sd = np.sqrt(p**2 * (1 / pi - 1) / n)
    within = np.abs(mean - p) <= 5 * sd + 2e-3 * p
    if rows_of is scoring.sampled_rows:
        assert within.all(), np.flatnonzero(~within)
    else:
        assert not within.any()


def test_sampled_rows_are_distinct_ordered_exact_where_kept_and_sum_to_one():
    gen = torch.Generator().manual_seed(3)
    vocab, k = 5000, 10
    x = torch.randn(40, vocab, generator=gen) * 3
    x[1] = -80.0
    x[1, 7] = 80.0  # one token has everything: the others underflow in float32
    x[2, :3] = 30.0  # three tokens share everything
    x[3] = 0.0  # uniform: nothing is kept, every entry is drawn
    targets = torch.randint(vocab, (40,), generator=gen)
    uniforms = torch.from_numpy(np.random.default_rng(4).random(40))
    ids, lp, tail, nll = scoring.sampled_rows(x, targets, k, uniforms)
    top_ids, top_lp, _, top_nll = scoring.top_k_rows(x, targets, k)
    full = torch.log_softmax(x, -1)
    assert torch.equal(nll, top_nll)  # the model's own NLL of the real token
    for r in range(40):
        row_ids, row_lp = ids[r].long(), lp[r].float()
        assert len(set(row_ids.tolist())) == k
        assert all((row_lp[i], -row_ids[i]) >= (row_lp[i + 1], -row_ids[i + 1]) for i in range(k - 1))
        assert abs(float(row_lp.double().exp().sum() + tail[r].double()) - 1) < 3e-3
        lowest = row_lp == row_lp[-1]
        # entries above the row's smallest value are kept tokens: their exact log-probs, as in the top-k
        assert torch.equal(row_lp[~lowest], full[r, row_ids[~lowest]].half().float())
        assert set(row_ids[~lowest].tolist()) <= set(top_ids[r].tolist())
    # nothing left to draw: the top-k, exactly
    assert tail[1] == 0 and torch.equal(ids[1], top_ids[1]) and torch.equal(lp[1], top_lp[1])
    assert set(ids[2, :3].tolist()) == {0, 1, 2}
    assert (lp[3] == lp[3, 0]).all() and abs(float(lp[3, 0]) - np.log(1 / k)) < 1e-3  # every entry estimates 1 / k
    assert (tail[[0, 2, 3]] == 0).all()


def test_sampled_rows_round_trip_and_keep_the_model_nll(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(micro.models["target"])).eval()
    tok = AutoTokenizer.from_pretrained(str(micro.models["target"]))
    texts = [micro.corpus.read_text()[i * 500 : i * 500 + 200] for i in range(6)]
    blocks = tok(texts, add_special_tokens=False)["input_ids"]
    results = scoring.Sampled(model, 8, "cpu", seed=5)(blocks, tok.bos_token_id)
    stored = logits.pack(blocks, results, [len(t.encode()) for t in texts], model.config.vocab_size, 8, "sampled")
    back = logits.decode(stored, [n for n in logits.NEEDS if not n.startswith("cont_")], 8)
    assert np.array_equal(back["topk_ids"], np.concatenate([r[0] for r in results]))
    computed_lp = np.concatenate([r[1] for r in results])
    assert np.array_equal(back["topk_logprobs"].view(np.uint16), computed_lp.view(np.uint16))
    nll = np.concatenate([r[3] for r in results])
    assert np.array_equal(back["nll"].view(np.uint16), nll.astype(np.float16).view(np.uint16))
    # rows whose real token is a sampled entry exist, and their stored value is not the token's log-prob
    listed_at = back["topk_ids"] == back["tokens"][:, None]
    assert len(stored["nll_estimated"]) > 0
    assert (-back["topk_logprobs"][listed_at] != back["nll"][listed_at.any(1)]).any()
    # the draws depend on the seed and each block's tokens, not on how blocks are batched
    again = scoring.Sampled(model, 8, "cpu", seed=5)(blocks[::-1], tok.bos_token_id)[::-1]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(results, again))
    other = scoring.Sampled(model, 8, "cpu", seed=6)(blocks, tok.bos_token_id)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(results, other))
