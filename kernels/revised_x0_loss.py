"""Per-sample generator loss L = sum_k w_k mean((x0_hat - target_k)^2) / n_k over k in (KL, CFG, reward).

n_KL = n_CFG = mean|x0_hat - ref_real| + eps and n_reward = mean|x0_hat - ref_reward| + eps are computed in
the same pass and carry no gradient; the weights w_k are the caller's (w_kl, w_cfg, w_reward), per call or per
sample (`tdm_r1_kernels.reference.revised_x0_weights`). One pass produces five per-sample sums; backward is a
second pass:
dL_i/dx0_hat = (2/D) sum_k (w_k / n_k) (x0_hat - target_k), D the per-sample element count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import alloc, block_for, check_like, compute_dtype, launch_opts, rows, tl, triton
from .dispatch import resolve_backend
from .reference import REVISED_X0_EPS, RevisedX0Weights, revised_x0_loss_ref, revised_x0_weights

__all__ = ["RevisedX0LossFunction", "fused_revised_x0_loss", "revised_x0_loss_bwd", "revised_x0_loss_fwd"]

N_SUMS = 5  # sum|x - ref_real|, sum|x - ref_reward|, sum (x - t_kl)^2, sum (x - t_cfg)^2, sum (x - t_reward)^2


@triton.jit
def _revised_x0_loss_fwd_kernel(
    x_ptr, tk_ptr, tc_ptr, tr_ptr, rr_ptr, rs_ptr, partial_ptr, D, NCHUNK,
    HAS_REW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    dk = x - tl.load(tk_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    dc = x - tl.load(tc_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    dr = x - tl.load(rr_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    p = partial_ptr + (i_b * NCHUNK + i_d) * 5
    tl.store(p + 0, tl.sum(tl.abs(dr), axis=0))
    tl.store(p + 2, tl.sum(dk * dk, axis=0))
    tl.store(p + 3, tl.sum(dc * dc, axis=0))
    if HAS_REW:
        dw = x - tl.load(tr_ptr + o, mask=m_d, other=0.0).to(tl.float32)
        ds = x - tl.load(rs_ptr + o, mask=m_d, other=0.0).to(tl.float32)
        tl.store(p + 1, tl.sum(tl.abs(ds), axis=0))
        tl.store(p + 4, tl.sum(dw * dw, axis=0))
    else:
        tl.store(p + 1, 0.0)
        tl.store(p + 4, 0.0)


@triton.jit
def _revised_x0_loss_bwd_kernel(
    x_ptr, tk_ptr, tc_ptr, tr_ptr, coef_ptr, grad_ptr, D, HAS_REW: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    ck = tl.load(coef_ptr + i_b * 3)
    cc = tl.load(coef_ptr + i_b * 3 + 1)
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    g = ck * (x - tl.load(tk_ptr + o, mask=m_d, other=0.0).to(tl.float32))
    g += cc * (x - tl.load(tc_ptr + o, mask=m_d, other=0.0).to(tl.float32))
    if HAS_REW:
        cr = tl.load(coef_ptr + i_b * 3 + 2)
        g += cr * (x - tl.load(tr_ptr + o, mask=m_d, other=0.0).to(tl.float32))
    tl.store(grad_ptr + o, g.to(grad_ptr.dtype.element_ty), mask=m_d)


def revised_x0_loss_fwd(
    x0_hat: Tensor,
    target_kl: Tensor,
    target_cfg: Tensor,
    target_reward: Tensor | None,
    ref_real: Tensor,
    ref_reward: Tensor | None,
    backend: str,
) -> Tensor:
    """Per-sample sums, fp32 [B, 5]: sum|x-ref_real|, sum|x-ref_reward|, sum (x-t)^2 for t in (kl, cfg, reward)."""
    tensors = (x0_hat, target_kl, target_cfg, target_reward, ref_real, ref_reward)
    for name, t in zip(("target_kl", "target_cfg", "target_reward", "ref_real", "ref_reward"), tensors[1:]):
        check_like(name, t, x0_hat)
    dtype = compute_dtype(*tensors)
    xr, tk, tc, tr, rr, rs = (rows(t, backend, dtype) for t in tensors)
    B, D = xr.shape
    if backend == "triton":
        BLOCK = block_for(D)
        nchunk = triton.cdiv(D, BLOCK)
        partial = alloc((B, nchunk, N_SUMS), torch.float32, x0_hat.device)
        _revised_x0_loss_fwd_kernel[(nchunk, B)](
            xr, tk, tc, xr if tr is None else tr, rr, xr if rs is None else rs, partial, D, nchunk,
            HAS_REW=tr is not None, BLOCK=BLOCK, **launch_opts(),
        )  # fmt: skip
        return partial.sum(1)
    sums = alloc((B, N_SUMS), torch.float32, x0_hat.device)
    torch.ops.tdm_r1.revised_x0_loss(xr, tk, tc, tr, rr, rs, sums)
    return sums


def revised_x0_loss_bwd(
    coef: Tensor, x0_hat: Tensor, target_kl: Tensor, target_cfg: Tensor, target_reward: Tensor | None, backend: str
) -> Tensor:
    """grad = sum_k coef[:, k] (x0_hat - target_k), with coef fp32 [B, 3]; x0_hat's shape and dtype."""
    tensors = (x0_hat, target_kl, target_cfg, target_reward)
    dtype = x0_hat.dtype if backend == "triton" else compute_dtype(*tensors)
    xr, tk, tc, tr = (rows(t, backend, dtype) for t in tensors)
    B, D = xr.shape
    grad = alloc(xr.shape, dtype, x0_hat.device)
    if backend == "triton":
        BLOCK = block_for(D)
        _revised_x0_loss_bwd_kernel[(triton.cdiv(D, BLOCK), B)](
            xr, tk, tc, xr if tr is None else tr, coef, grad, D, HAS_REW=tr is not None, BLOCK=BLOCK, **launch_opts()
        )
    else:
        torch.ops.tdm_r1.revised_x0_loss_backward(xr, tk, tc, tr, coef, grad)
    return grad.view(x0_hat.shape).to(x0_hat.dtype)


def _combine(sums: Tensor, weights: Tensor, D: int, eps: float, has_reward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss [B], terms [B, 3], normalisers [B, 3]) from the per-sample sums. Without a reward term its sums are
    0 and its normaliser is set to 1, so L_reward = 0 (not 0/0 when eps = 0)."""
    n_real = sums[:, 0] / D + eps
    n_sur = sums[:, 1] / D + eps if has_reward else torch.ones_like(n_real)
    norm = torch.stack([n_real, n_real, n_sur], dim=1)
    terms = sums[:, 2:] / D / norm
    return (terms * weights).sum(1), terms, norm


class RevisedX0LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0_hat, target_kl, target_cfg, target_reward, ref_real, ref_reward, weights, eps, backend):
        sums = revised_x0_loss_fwd(x0_hat, target_kl, target_cfg, target_reward, ref_real, ref_reward, backend)
        D = max(x0_hat[0].numel(), 1)
        loss, terms, norm = _combine(sums, weights, D, eps, target_reward is not None)
        ctx.save_for_backward(x0_hat, target_kl, target_cfg, target_reward, weights, norm)
        ctx.backend = backend
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, g_loss, g_terms):
        x0_hat, target_kl, target_cfg, target_reward, weights, norm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            D = max(x0_hat[0].numel(), 1)
            coef = (g_loss.float()[:, None] * weights * (2.0 / D) / norm).contiguous()
            grad = revised_x0_loss_bwd(coef, x0_hat, target_kl, target_cfg, target_reward, ctx.backend)
        return grad, None, None, None, None, None, None, None, None


def fused_revised_x0_loss(
    x0_hat: Tensor,
    target_kl: Tensor,
    target_cfg: Tensor,
    target_reward: Tensor | None,
    ref_real: Tensor,
    ref_reward: Tensor | None,
    weights: RevisedX0Weights,
    *,
    eps: float = REVISED_X0_EPS,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample generator loss: (loss [B] fp32, differentiable wrt x0_hat; terms [B, 3] fp32, no grad).

    x0_hat [B, ...]: generator prediction x - s_j v (with grad). Stop-gradient [B, ...] inputs:
    target_kl = x0_hat + (x0_real_cond - x0_fake), target_cfg = x0_hat + (cfg - 1)(x0_real_cond - x0_real_uncond),
    target_reward = x0_hat + (x0_sur^cfg - x0_ref) (None with ref_reward=None turns the reward term off),
    ref_real = x0_real^cfg (normaliser of KL and CFG), ref_reward = x0_sur^cfg (normaliser of the reward term).
    weights: (w_kl, w_cfg, w_reward) for every sample, or a [B, 3] tensor per sample; the caller decides them
    (DESIGN section 5: (1, w_tdm, 1 - w_tdm) before trunc_steps, (w_tdm, w_tdm, 0) from it and in distillation).
    loss = w_kl L_kl + w_cfg L_cfg + w_reward L_reward; terms holds the unweighted (L_kl, L_cfg, L_reward).
    """
    if (target_reward is None) != (ref_reward is None):
        raise ValueError("target_reward and ref_reward must be given together")
    dtype = compute_dtype(x0_hat, target_kl, target_cfg, target_reward, ref_real, ref_reward)
    backend = resolve_backend(x0_hat.device, backend, dtype)
    if backend == "reference":
        return revised_x0_loss_ref(x0_hat, target_kl, target_cfg, target_reward, ref_real, ref_reward, weights, eps)
    weights = revised_x0_weights(weights, x0_hat.shape[0], x0_hat.device, target_reward is not None)
    detached = (
        t.detach() if t is not None else None for t in (target_kl, target_cfg, target_reward, ref_real, ref_reward)
    )
    return RevisedX0LossFunction.apply(x0_hat, *detached, weights, eps, backend)
