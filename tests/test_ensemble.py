"""Probability ensembles (fusion/ensemble.py) against straightforward reference implementations:
full forward passes without caches, probabilities averaged by hand, one row at a time."""

import math

import numpy as np
import pytest
import torch

from fusion import tiny
from fusion.ensemble import Ensemble, Member, bits_per_byte, score_aligned, score_texts


@pytest.fixture(scope="module")
def texts():
    docs = [t for t, _ in tiny._documents(tiny._module_files(packages=True)[:12])]
    return docs


@pytest.fixture(scope="module")
def members(texts):
    """Three architectures on one SentencePiece-style tokenizer, one byte-level model apart."""
    sp = tiny.train_tokenizer("sentencepiece", texts[::2], 400)
    bl = tiny.train_tokenizer("byte-level", texts[1::2], 400)
    out = {}
    for name, arch, tok, seed in [("llama", "llama", sp, 0), ("neox", "gpt_neox", sp, 1), ("gpt2", "gpt2", sp, 2),
                                  ("other", "llama", bl, 3)]:
        model = tiny.make_model(arch, len(tok), hidden=32, layers=1, tokenizer=tok, seed=seed).eval()
        out[name] = Member(name, model, tok, weight=1.0 + seed)
    return out


def reference_nll(members, token_ids):
    """sum_t -log sum_i w_i p_i(token_t | start, tokens before t), every model run on the whole
    sequence with no cache."""
    w = np.array([m.weight for m in members]) / sum(m.weight for m in members)
    out = []
    for ids in token_ids:
        x = torch.tensor([[members[0].context_id, *ids]])
        with torch.no_grad():
            probs = sum(wi * torch.softmax(m.model(input_ids=x).logits[0, :-1, : m.vocab_size].double(), -1)
                        for wi, m in zip(w, members))
        out.append(-torch.log(probs[torch.arange(len(ids)), torch.tensor(ids)]).sum().item())
    return np.array(out)


def test_same_vocabulary_scores_match_the_reference(members, texts):
    group = [members["llama"], members["neox"], members["gpt2"]]
    tok = group[0].tokenizer
    token_ids = [tok(t[:n], add_special_tokens=False)["input_ids"] for t, n in zip(texts[:5], (300, 90, 500, 40, 220))]
    expected = reference_nll(group, token_ids)
    # small chunks: every sequence crosses several KV-cache steps, with padding in the batch
    got = Ensemble(group).score(token_ids, chunk_tokens=7, batch_tokens=4096)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # a single member is the model itself
    np.testing.assert_allclose(Ensemble(group[:1]).score(token_ids), reference_nll(group[:1], token_ids), rtol=1e-5)


def test_greedy_generation_matches_full_recomputation(members):
    group = [members["llama"], members["gpt2"]]
    ens = Ensemble(group)
    prompt = group[0].tokenizer("def main(args):", add_special_tokens=False)["input_ids"]
    got = ens.generate(prompt, 12, stop_at_eos=False)
    seq = [ens.context_id, *prompt]
    w = ens.weights
    for _ in range(12):
        with torch.no_grad():
            probs = sum(wi * torch.softmax(m.model(input_ids=torch.tensor([seq])).logits[0, -1, : m.vocab_size].double(), -1)
                        for wi, m in zip(w, group))
        seq.append(int(torch.argmax(probs)))
    assert got == seq[len(prompt) + 1 :]
    sampled = ens.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
    assert sampled == ens.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False) and len(sampled) == 8


def test_different_vocabularies_need_alignment(members):
    with pytest.raises(Exception, match="different vocabularies"):
        Ensemble([members["llama"], members["other"]])


def test_aligned_scores_match_a_row_by_row_reference(members, texts):
    from fusion.align import align_blocks, token_view

    base, other = members["llama"], members["other"]
    blocks = [t[:n] for t, n in zip(texts[:4], (200, 350, 120, 260))]
    stats = {}
    got = score_aligned([base, other], blocks, top_k=16, stats=stats)
    assert 0.3 < stats["other"]["coverage"] <= 1.0

    # the reference: each model once over each block, then a plain loop over the base's rows
    w = np.array([base.weight, other.weight]) / (base.weight + other.weight)
    b_ids = [base.tokenizer(t, add_special_tokens=False)["input_ids"] for t in blocks]
    o_ids = [other.tokenizer(t, add_special_tokens=False)["input_ids"] for t in blocks]
    flat_b = np.array([t for ids in b_ids for t in ids])
    ptr_b = np.cumsum([0] + [len(i) for i in b_ids])
    topk_ids, topk_lp, tails = [], [], []
    for ids in o_ids:
        with torch.no_grad():
            lp = torch.log_softmax(other.model(input_ids=torch.tensor([[other.context_id, *ids]])).logits[0, :-1].float(), -1)
        v, i = lp.topk(16, -1)
        topk_ids.append(i.numpy())
        topk_lp.append(v.numpy())
        tails.append((1 - v.exp().sum(-1)).clamp_min(0).numpy())
    rows = align_blocks(blocks, flat_b, ptr_b, np.array([t for ids in o_ids for t in ids]),
                        np.cumsum([0] + [len(i) for i in o_ids]), np.concatenate(topk_ids), np.concatenate(topk_lp),
                        np.concatenate(tails), token_view(base.tokenizer), token_view(other.tokenizer), None, "default")
    expected = []
    starts = rows.ptr
    for blk, ids in enumerate(b_ids):
        with torch.no_grad():
            p_base = torch.softmax(base.model(input_ids=torch.tensor([[base.context_id, *ids]])).logits[0, :-1].double(), -1)
        total = 0.0
        for j, label in enumerate(ids):
            r = ptr_b[blk] + j
            num, den = w[0] * p_base[j, label].item(), w[0]
            n = rows.counts[r]
            if n > 0:
                listed = dict(zip(rows.ids[starts[r] : starts[r] + n].tolist(),
                                  np.exp(rows.logprobs[starts[r] : starts[r] + n].astype(np.float64)).tolist()))
                mass = sum(listed.values()) + rows.tail[r]  # rows are renormalised to 1
                p = listed[label] / mass if label in listed else rows.tail[r] / mass / (base.vocab_size - n)
                num, den = num + w[1] * p, den + w[1]
            total -= math.log(num / den)
        expected.append(total)
    np.testing.assert_allclose(got, expected, rtol=1e-4)

    # the base alone is the base model exactly, and a member of weight 0 changes nothing
    alone = score_aligned([base], blocks)
    np.testing.assert_allclose(alone, reference_nll([base], b_ids), rtol=1e-5)
    muted = Member("muted", other.model, other.tokenizer, weight=0.0)
    np.testing.assert_allclose(score_aligned([base, muted], blocks), alone, rtol=1e-12)
    assert 0 < bits_per_byte(got, blocks) < 20


def test_score_texts_picks_the_exact_path_for_one_vocabulary(members, texts):
    group = [members["llama"], members["neox"]]
    blocks = [t[:150] for t in texts[:3]]
    ids = [group[0].tokenizer(t, add_special_tokens=False)["input_ids"] for t in blocks]
    np.testing.assert_allclose(score_texts(group, blocks), reference_nll(group, ids), rtol=1e-5)


def test_cli_scores_and_generates(members, tmp_path, capsys):
    import json

    from fusion.cli import main

    folders = []
    for name in ("llama", "gpt2", "other"):
        m = members[name]
        m.model.save_pretrained(tmp_path / name)
        m.tokenizer.save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    text = tmp_path / "text.txt"
    text.write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 20)
    capsys.readouterr()  # saving may import DeepSpeed (through transformers), which logs to stdout once
    assert main(["ensemble", "score", *folders, "--text", str(text), "--block-tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["same_vocabulary"] is False and 0 < report["bits_per_byte"] < 20 and report["blocks"] > 1
    assert main(["ensemble", "generate", *folders[:2], "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["ensemble", "generate", *folders, "--prompt", "def "]) == 3  # different vocabularies


def test_members_load_through_the_one_model_loader(members, tmp_path):
    from fusion.ensemble import load_member
    from fusion.errors import FusionError
    from fusion.models import load_folder

    m = members["gpt2"]
    m.model.save_pretrained(tmp_path / "gpt2")
    m.tokenizer.save_pretrained(tmp_path / "gpt2")
    loaded = load_member(tmp_path / "gpt2")
    assert not loaded.model.training
    for name, value in m.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert load_folder(tmp_path / "gpt2", "bfloat16").dtype == torch.bfloat16
    for weights in (tmp_path / "gpt2").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FusionError, match=r"^ensemble: cannot load .*gpt2"):
        load_member(tmp_path / "gpt2")
