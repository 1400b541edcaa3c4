import math

import pytest
import torch

from fusion.errors import FusionError
from fusion.loss import fusion_loss

B, L, V, K = 3, 9, 61, 6


def make_case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, -2:] = -100
    labels[2, 0] = -100
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * L)]).view(B, L, K)
    tail = torch.rand(B, L, generator=g, dtype=torch.float64) * 0.5
    lp = torch.log_softmax(torch.randn(B, L, K, generator=g, dtype=torch.float64), -1)
    lp = lp + torch.log1p(-tail)[..., None]
    ids[0, 1, 3:] = -1  # short rows
    ids[1, 4, 1:] = -1
    ids[1, 2] = -1  # empty rows
    ids[2, 5] = -1
    ids[1, 6, 0] = labels[1, 6]  # the label listed
    lp = lp.masked_fill(ids < 0, float("-inf"))
    tail[1, 2] = tail[2, 5] = 0.0
    return logits, labels, ids, lp, tail


def dense_loss(logits, labels, ids, lp, tail, lam, temperature=1.0, kind="ce", mode="bucket"):
    """Straightforward reference: dense teacher [B, L, V+1] (last column = the tail outcome)."""
    logq = torch.log_softmax(logits.double(), -1)
    total, clm_total, fus_total, n = 0.0, 0.0, 0.0, 0
    for b in range(B):
        for i in range(L):
            y = int(labels[b, i])
            if y == -100:
                continue
            n += 1
            clm = -logq[b, i, y]
            real = ids[b, i] >= 0
            if not real.any():
                P = torch.zeros(V, dtype=torch.float64)
                P[y] = 1.0
                pt = torch.tensor(0.0, dtype=torch.float64)
            else:
                r_ids, r_lp = ids[b, i][real], lp[b, i][real].double()
                pt = tail[b, i].double() if mode == "bucket" else torch.tensor(0.0, dtype=torch.float64)
                pt = pt / (r_lp.exp().sum() + pt)
                P = torch.zeros(V, dtype=torch.float64)
                P[r_ids] = torch.softmax(r_lp / temperature, 0) * (1 - pt)
            listed = P > 0
            if not real.any():
                listed = torch.zeros(V, dtype=torch.bool)
                listed[y] = True
            else:
                listed = torch.zeros(V, dtype=torch.bool)
                listed[ids[b, i][real]] = True
            log_q_tail = torch.logsumexp(logq[b, i][~listed], 0)
            fus = -(P * logq[b, i]).sum() - (pt * log_q_tail if pt > 0 else 0.0)
            if kind == "kl":
                fus = fus + torch.special.xlogy(P, P).sum() + torch.special.xlogy(pt, pt)
            clm_total = clm_total + clm
            fus_total = fus_total + fus
            total = total + lam * clm + (1 - lam) * fus
    return total / n, clm_total / n, fus_total / n


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_dense_reference_values_and_gradients(mode, kind, temperature, chunk_size):
    logits, labels, ids, lp, tail = make_case()
    lam = 0.7
    x = logits.clone().requires_grad_()
    out = fusion_loss(x, labels, ids, lp, tail, lam, temperature, kind, mode, chunk_size=chunk_size)
    out["loss"].backward()
    y = logits.clone().requires_grad_()
    ref, ref_clm, ref_fus = dense_loss(y, labels, ids, lp, tail, lam, temperature, kind, mode)
    ref.backward()
    assert out["tokens"] == B * L - 3
    torch.testing.assert_close(out["loss"], ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(out["clm"], ref_clm, rtol=0, atol=1e-10)
    torch.testing.assert_close(out["fusion"], ref_fus, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-12)


def test_pinned_tiny_case():
    # uniform student over 4 ids; teacher lists id 2 with p = 0.5 and keeps 0.5 in the tail
    logits = torch.zeros(1, 1, 4, dtype=torch.float64)
    labels = torch.tensor([[1]])
    ids = torch.tensor([[[2]]])
    lp, tail = torch.tensor([[[math.log(0.5)]]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    bucket = fusion_loss(logits, labels, ids, lp, tail, lam=0.9)
    # fusion = -0.5 log(1/4) - 0.5 log(3/4); clm = log 4
    assert bucket["clm"].item() == pytest.approx(1.3862943611198906, abs=1e-12)
    assert bucket["fusion"].item() == pytest.approx(0.8369882167858358, abs=1e-12)
    assert bucket["loss"].item() == pytest.approx(1.3313637466864852, abs=1e-12)
    renorm = fusion_loss(logits, labels, ids, lp, tail, lam=0.9, tail="renormalize")
    assert renorm["fusion"].item() == pytest.approx(1.3862943611198906, abs=1e-12)
    kl = fusion_loss(logits, labels, ids, lp, tail, lam=0.9, kind="kl")
    # minus the teacher's entropy log 2
    assert kl["fusion"].item() == pytest.approx(0.8369882167858358 - math.log(2), abs=1e-12)


def test_empty_teacher_rows_equal_clm():
    logits, labels, ids, lp, tail = make_case()
    ids = torch.full_like(ids, -1)
    for mode in ("bucket", "renormalize"):
        for kind in ("ce", "kl"):
            out = fusion_loss(logits, labels, ids, lp, tail, 0.3, 2.0, kind, mode)
            torch.testing.assert_close(out["fusion"], out["clm"], rtol=0, atol=1e-12)
    none = fusion_loss(logits, labels, ids[..., :0], lp[..., :0], None, 0.3)
    torch.testing.assert_close(none["fusion"], none["clm"], rtol=0, atol=1e-12)


def test_ignored_positions_have_no_effect():
    logits, labels, ids, lp, tail = make_case()
    x = logits.clone().requires_grad_()
    out = fusion_loss(x, labels, ids, lp, tail, 0.5)
    out["loss"].backward()
    ignored = labels == -100
    assert (x.grad[ignored] == 0).all() and (x.grad[~ignored] != 0).any()
    changed = logits.clone()
    changed[ignored] = 100.0
    ids2, lp2 = ids.clone(), lp.clone()
    ids2[ignored] = 7
    again = fusion_loss(changed, labels, ids2, lp2, tail, 0.5)
    torch.testing.assert_close(again["loss"], out["loss"].detach(), rtol=0, atol=0)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits, labels, ids, lp, tail = make_case()
    x = logits.clone().requires_grad_()
    out = fusion_loss(x, torch.full_like(labels, -100), ids, lp, tail, 0.5)
    out["loss"].backward()
    assert out["tokens"] == 0 and out["loss"].item() == 0.0 and (x.grad == 0).all()


def test_sum_reduction_and_chunks_agree():
    logits, labels, ids, lp, tail = make_case()
    grads = []
    for chunk in (None, 1, 5, 1000):
        x = logits.clone().requires_grad_()
        s = fusion_loss(x, labels, ids, lp, tail, 0.5, chunk_size=chunk, reduction="sum")
        (2.0 * s["loss"]).backward()
        grads.append(x.grad)
    m = fusion_loss(logits, labels, ids, lp, tail, 0.5)
    torch.testing.assert_close(s["loss"].detach(), m["loss"] * m["tokens"], rtol=1e-12, atol=0)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=1e-12)


def test_shifted_noncontiguous_view():
    logits, labels, ids, lp, tail = make_case()
    full = torch.cat([logits, torch.randn(B, 1, V, dtype=logits.dtype)], 1).requires_grad_()
    out = fusion_loss(full[:, :-1], labels, ids, lp, tail, 0.5, chunk_size=4)
    out["loss"].backward()
    x = logits.clone().requires_grad_()
    ref = fusion_loss(x, labels, ids, lp, tail, 0.5)
    ref["loss"].backward()
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=0, atol=1e-12)
    torch.testing.assert_close(full.grad[:, :-1], x.grad, rtol=0, atol=1e-12)
    assert (full.grad[:, -1] == 0).all()


def test_bf16_logits_are_upcast_and_stable():
    logits, labels, ids, lp, tail = make_case()
    big = (logits * 300).to(torch.bfloat16)  # logit gaps of hundreds: q underflows in bf16
    x = big.clone().requires_grad_()
    out = fusion_loss(x, labels, ids, lp.float(), tail.float(), 0.9)
    out["loss"].backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    y = big.double().requires_grad_()
    ref, _, _ = dense_loss(y, labels, ids, lp, tail, 0.9)
    ref.backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"].double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=0, atol=1e-2 / (B * L))


def test_no_grad_mode_and_second_backward():
    logits, labels, ids, lp, tail = make_case()
    with torch.no_grad():
        out = fusion_loss(logits.clone().requires_grad_(), labels, ids, lp, tail, 0.5)
    assert out["loss"].grad_fn is None
    x = logits.clone().requires_grad_()
    loss = fusion_loss(x, labels, ids, lp, tail, 0.5)["loss"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_input_names_the_culprit():
    logits, labels, ids, lp, tail = make_case()
    with pytest.raises(FusionError, match="labels"):
        fusion_loss(logits, labels[:, :-1], ids, lp, tail, 0.5)
    with pytest.raises(FusionError, match="tail="):
        fusion_loss(logits, labels, ids, lp, tail, 0.5, tail="drop")
    with pytest.raises(FusionError, match="lam"):
        fusion_loss(logits, labels, ids, lp, tail, 1.5)


def test_unlisted_mass_below_float32_range_is_computed_exactly():
    """Rows whose unlisted logits sit ~150 below the listed ones: exp underflows in float32,
    so Q_tail comes from a logsumexp over the unlisted ids (the teacher has a tail there)."""
    logits, labels, ids, lp, tail = make_case()
    far = logits.clone() - 150.0
    listed = ids.clamp(min=0)
    far.scatter_(2, listed, logits.gather(2, listed))  # listed ids keep their logits
    x = far.float().requires_grad_()
    out = fusion_loss(x, labels, ids, lp.float(), tail.float(), 0.7)
    out["loss"].backward()
    y = far.clone().requires_grad_()
    ref, _, ref_fus = dense_loss(y, labels, ids, lp, tail, 0.7)
    ref.backward()
    assert ref_fus > 10  # the tail term is large: the student puts e^-150 where the teacher has 0.25
    torch.testing.assert_close(out["loss"].double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=0, atol=1e-6)
