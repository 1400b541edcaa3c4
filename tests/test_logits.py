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
    stored = logits.pack(blocks, results, [len(t.encode()) for t in texts], model.config.vocab_size, 8, m)
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
