"""The fusion training loss on sparse teacher rows: L = lam * L_CLM + (1 - lam) * L_fusion.

Per real position (label != ignore_index) the student's distribution is Q = softmax(z) over the
full vocabulary (z: logits, already shifted so that z[b, i] predicts labels[b, i]); the teacher
P is sparse: K listed ids with log-probabilities l_k and a tail mass t (what is not listed).
P is never made dense.

Teacher P (ids must be distinct within a row; -1 marks padding):
- tail="bucket" (default): the tail is one more outcome, "some unlisted token". With
  S = sum_k exp(l_k), P_tail = t / (S + t) and P_k = (1 - P_tail) * softmax(l / T)_k. The
  student's matching outcome is Q_tail = sum of q over the unlisted ids, computed exactly as
  logsumexp(z over unlisted ids) - logsumexp(z) (no 1 - sum q cancellation).
- tail="renormalize" (the original): P_k = softmax(l / T)_k over the listed ids and the tail is
  dropped, which over-sharpens the teacher (NOTES.md defect 6).
Temperature T applies to the teacher only, as in the original, and reshapes only the listed
part: P_tail is kept, since the shape of the mass inside the tail is unknown. The student is
never tempered (its log-softmax is shared with the CLM term) and there is no T^2 factor.

L_fusion per position: kind="ce": -sum_k P_k log q_k - P_tail log Q_tail (the original's
soft-label cross-entropy); kind="kl": that minus the teacher's entropy, same gradient.
A row without teacher entries is the one-hot on its label, so there L_fusion = L_CLM.
L_CLM = -log q_label. Both are averaged over real positions (reduction="mean") or summed
("sum", for dividing by a global token count yourself).

Memory: the positions are processed `chunk_size` at a time; per chunk the loss and its gradient
with respect to the chunk's logits are computed in forward, in float32 (float64 for float64
logits), and stored in the logits' dtype. So no [B, L, V] float32 temporary exists, only
one [chunk_size, V] one, plus one gradient buffer the size of the logits until backward.
Gradient per position: q - (1 - lam) * (P scattered on the listed ids + P_tail * q restricted
to the unlisted ids / Q_tail) - lam * onehot(label).

Speed: one exponential pass over the chunk serves everything. With m the row maximum and
e = exp(z - m), the unlisted sum S_u (listed entries zeroed, then summed) and the listed sum
are both sums of positive terms, so Q_tail = S_u / (S_u + listed) has no cancellation. Only
where S_u underflows (below sqrt of the smallest normal float: the unlisted logits sit hundreds
below the maximum) and the teacher has a tail are those rows redone with a logsumexp over the
unlisted ids. The chunk's buffer then becomes the gradient in place.
"""

from __future__ import annotations

import torch

from fusion.errors import FusionError


def teacher_probs(teacher_ids, teacher_logprobs, teacher_tail, temperature=1.0, tail="bucket", dtype=torch.float32):
    """The teacher's listed probabilities P [..., K] (0 at padding) and tail P_tail [...]."""
    pad = teacher_ids < 0
    lp = teacher_logprobs.to(dtype).masked_fill(pad, float("-inf"))
    empty = pad.all(-1, keepdim=True)
    lp_safe = lp.masked_fill(empty, 0.0)  # keeps softmax of an empty row finite; zeroed below
    listed = torch.softmax(lp_safe / temperature, -1).masked_fill(pad, 0.0)
    if tail == "renormalize" or teacher_tail is None:
        return listed, torch.zeros(lp.shape[:-1], dtype=dtype, device=lp.device)
    t = teacher_tail.to(dtype).clamp(min=0.0).masked_fill(empty.squeeze(-1), 0.0)
    s = torch.exp(lp_safe).masked_fill(pad, 0.0).sum(-1)
    p_tail = torch.where(s + t > 0, t / (s + t), torch.zeros_like(t))
    return listed * (1 - p_tail).unsqueeze(-1), p_tail


class _SparseFusionLoss(torch.autograd.Function):
    """Forward returns (loss, clm_sum, ce_sum); only loss is differentiable. The gradient of
    loss with respect to the logits is computed chunk by chunk in forward (see module doc)."""

    @staticmethod
    def forward(ctx, logits, bi, li, labels, ids, pad, p, p_tail, lam, scale, chunk_size, want_grad):
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tiny = torch.finfo(cdt).tiny ** 0.5
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format) if want_grad else None
        clm_sum = torch.zeros((), dtype=cdt, device=logits.device)
        ce_sum = torch.zeros((), dtype=cdt, device=logits.device)
        n = bi.numel()
        step = chunk_size or max(n, 1)
        for a in range(0, n, step):
            sl = slice(a, a + step)
            z = logits[bi[sl], li[sl]].to(cdt)  # a fresh [c, V] copy: safe to overwrite
            lab, idc, padc, pc, ptc = labels[sl, None], ids[sl], pad[sl], p[sl], p_tail[sl, None]
            z_lab, z_listed = z.gather(1, lab), z.gather(1, idc)
            m = z.amax(-1, keepdim=True)
            z.sub_(m).exp_()  # e = exp(z - m)
            e_listed = (z_listed - m).exp().masked_fill(padc, 0.0)
            z.scatter_(1, idc, 0.0)
            s_u = z.sum(-1, keepdim=True)  # unlisted mass (times e^-m)
            log_s = (s_u + e_listed.sum(-1, keepdim=True)).log()
            lse = m + log_s
            clm_sum += (lse - z_lab).sum()
            ce_sum -= (pc * (z_listed - lse)).sum()
            log_qt = s_u.log() - log_s
            exact = ((ptc > 0) & (s_u < tiny)).squeeze(1).nonzero().squeeze(1)
            if exact.numel():  # S_u underflowed: the unlisted logsumexp of these rows, exactly
                zz = logits[bi[sl][exact], li[sl][exact]].to(cdt).scatter_(1, idc[exact], float("-inf"))
                lse_u = torch.logsumexp(zz, -1, keepdim=True)  # -inf only if every id is listed
                log_qt[exact] = lse_u - lse[exact]
            ce_sum -= torch.where(ptc > 0, ptc * log_qt, torch.zeros_like(ptc)).sum()
            if not want_grad:
                continue
            # unlisted ids: q_j - (1-lam) P_tail q_j / Q_tail = e_j (1 / S - (1-lam) P_tail / S_u)
            tail_part = torch.where((ptc > 0) & (s_u >= tiny), ptc / s_u, torch.zeros_like(ptc))
            z.mul_((torch.exp(-log_s) - (1 - lam) * tail_part) * scale)
            if exact.numel():
                zz.sub_(torch.where(torch.isfinite(lse_u), lse_u, torch.zeros_like(lse_u))).exp_()
                z[exact] = zz.mul_((log_qt[exact].exp() - (1 - lam) * ptc[exact]) * scale)
            # listed ids: q_k - (1-lam) P_k; padding slots point at a real id of the row and add 0
            listed = (e_listed * torch.exp(-log_s) - (1 - lam) * pc).masked_fill(padc, 0.0)
            z.scatter_add_(1, idc, listed * scale)
            z.scatter_add_(1, lab, torch.full(lab.shape, -lam * scale, dtype=cdt, device=z.device))
            grad[bi[sl], li[sl]] = z.to(grad.dtype)
        ctx.grad = grad
        loss = scale * (lam * clm_sum + (1 - lam) * ce_sum)
        ctx.mark_non_differentiable(clm_sum, ce_sum)
        return loss, clm_sum, ce_sum

    @staticmethod
    def backward(ctx, g_loss, _g_clm, _g_ce):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("fusion_loss: backward ran twice through the same forward")
        return (grad.mul_(g_loss),) + (None,) * 11


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    lam: float,
    temperature: float = 1.0,
    kind: str = "ce",
    tail: str = "bucket",
    ignore_index: int = -100,
    chunk_size: int | None = 4096,
    reduction: str = "mean",
) -> dict:
    """lam * L_CLM + (1 - lam) * L_fusion over the real positions; see the module doc.

    logits [B, L, V] (any float dtype, may be a non-contiguous view such as logits[:, :-1]);
    labels [B, L] (ignore_index where no loss); teacher_ids [B, L, K] int (-1 = padding);
    teacher_logprobs [B, L, K] (-inf or anything at padding); teacher_tail [B, L] or None (= 0).
    chunk_size: positions per chunk (None: all at once). Returns {"loss": differentiable scalar,
    "clm", "fusion": detached scalars with the same reduction, "tokens": real positions}.
    """
    if logits.dim() != 3:
        raise FusionError(f"fusion_loss: logits must be [B, L, V], got {tuple(logits.shape)}")
    B, L, V = logits.shape
    if labels.shape != (B, L):
        raise FusionError(f"fusion_loss: labels {tuple(labels.shape)} do not match logits {(B, L)}")
    if teacher_ids.shape[:2] != (B, L) or teacher_logprobs.shape != teacher_ids.shape:
        raise FusionError(
            f"fusion_loss: teacher_ids {tuple(teacher_ids.shape)} / teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} do not match logits {(B, L)}"
        )
    if teacher_tail is not None and teacher_tail.shape != (B, L):
        raise FusionError(f"fusion_loss: teacher_tail {tuple(teacher_tail.shape)} does not match {(B, L)}")
    if kind not in ("ce", "kl"):
        raise FusionError(f"fusion_loss: kind={kind!r}, expected 'ce' or 'kl'")
    if tail not in ("bucket", "renormalize"):
        raise FusionError(f"fusion_loss: tail={tail!r}, expected 'bucket' or 'renormalize'")
    if reduction not in ("mean", "sum"):
        raise FusionError(f"fusion_loss: reduction={reduction!r}, expected 'mean' or 'sum'")
    if not 0.0 <= lam <= 1.0 or not temperature > 0:
        raise FusionError(f"fusion_loss: need 0 <= lam <= 1 and temperature > 0, got {lam}, {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise FusionError(f"fusion_loss: chunk_size={chunk_size} must be positive or None")

    if teacher_ids.shape[-1] == 0:  # no teacher entries at all: every row is the one-hot
        teacher_ids = torch.full((B, L, 1), -1, dtype=torch.long, device=logits.device)
        teacher_logprobs = torch.full((B, L, 1), float("-inf"), device=logits.device)
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    bi, li = (labels != ignore_index).nonzero(as_tuple=True)
    n = bi.numel()
    lab = labels[bi, li].long()
    ids = teacher_ids[bi, li].long()
    lp = teacher_logprobs[bi, li]
    tt = teacher_tail[bi, li] if teacher_tail is not None else None
    # an empty teacher row is the one-hot on its label
    empty = (ids < 0).all(-1)
    ids[empty, 0] = lab[empty]
    lp = lp.to(cdt).masked_fill(empty[:, None] & (torch.arange(ids.shape[1], device=ids.device) == 0), 0.0)
    if tt is not None:
        tt = tt.to(cdt).masked_fill(empty, 0.0)
    p, p_tail = teacher_probs(ids, lp, tt, temperature, tail, cdt)
    # padding slots point at the row's first real id (their probability is 0)
    first = ids.gather(1, (ids >= 0).int().argmax(-1, keepdim=True))
    pad = ids < 0
    ids = torch.where(pad, first, ids)

    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, clm_sum, ce_sum = _SparseFusionLoss.apply(
        logits, bi, li, lab, ids, pad, p, p_tail, float(lam), scale, chunk_size, want_grad
    )
    fusion = ce_sum
    if kind == "kl":
        entropy = -(torch.xlogy(p, p).sum() + torch.xlogy(p_tail, p_tail).sum())
        fusion = ce_sum - entropy
        loss = loss - scale * (1 - lam) * entropy
    return {
        "loss": loss,
        "clm": (clm_sum * scale).detach(),
        "fusion": (fusion * scale).detach(),
        "tokens": n,
    }
