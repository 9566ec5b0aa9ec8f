"""Per-sample l = mean((v* - v_pred)^2), v* = cx x + cn n = -x/(1-s) + (n/b)(tau + s^2 a/(1-s)), never stored.

(cx, cn) come from `tdm_r1_kernels.reference.velocity_target_coefficients` (exactly (-1, 1) at s = 0, so v* = n - x).
v* is a target: gradients flow to v_pred only. Backward: dl_i/dv_pred = (2/D) (v_pred - v*), D the
per-sample element count, recomputing v* from x and n instead of saving it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import alloc, block_for, check_like, compute_dtype, launch_opts, rows, tl, triton
from .dispatch import resolve_backend
from .reference import velocity_target_coefficients, velocity_target_mse_ref

__all__ = [
    "VelocityTargetMSEFunction",
    "fused_velocity_target_mse",
    "velocity_target_mse_bwd",
    "velocity_target_mse_fwd",
]


@triton.jit
def _velocity_target_mse_fwd_kernel(
    x_ptr, noise_ptr, v_ptr, cx_ptr, cn_ptr, partial_ptr, D, NCHUNK, BLOCK: tl.constexpr
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    cx = tl.load(cx_ptr + i_b)
    cn = tl.load(cn_ptr + i_b)
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    d = cx * x + cn * n - v
    tl.store(partial_ptr + i_b * NCHUNK + i_d, tl.sum(d * d, axis=0))


@triton.jit
def _velocity_target_mse_bwd_kernel(
    x_ptr, noise_ptr, v_ptr, cx_ptr, cn_ptr, scale_ptr, grad_ptr, D, BLOCK: tl.constexpr
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    cx = tl.load(cx_ptr + i_b)
    cn = tl.load(cn_ptr + i_b)
    g = tl.load(scale_ptr + i_b)
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    tl.store(grad_ptr + o, (g * (v - cx * x - cn * n)).to(grad_ptr.dtype.element_ty), mask=m_d)


def _prepare(x: Tensor, noise: Tensor, v_pred: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    check_like("noise", noise, x)
    check_like("v_pred", v_pred, x)
    dtype = v_pred.dtype if backend == "triton" else compute_dtype(x, noise, v_pred)
    return rows(x, backend, dtype), rows(noise, backend, dtype), rows(v_pred, backend, dtype), dtype


def velocity_target_mse_fwd(x: Tensor, noise: Tensor, v_pred: Tensor, cx: Tensor, cn: Tensor, backend: str) -> Tensor:
    """Per-sample mean squared error, fp32 [B], accumulated in fp32."""
    xr, nr, vr, _ = _prepare(x, noise, v_pred, backend)
    B, D = vr.shape
    if backend == "triton":
        BLOCK = block_for(D)
        nchunk = triton.cdiv(D, BLOCK)
        partial = alloc((B, nchunk), torch.float32, x.device)
        _velocity_target_mse_fwd_kernel[(nchunk, B)](
            xr, nr, vr, cx, cn, partial, D, nchunk, BLOCK=BLOCK, **launch_opts()
        )
        sq_sum = partial.sum(1)
    else:
        sq_sum = alloc((B,), torch.float32, x.device)
        torch.ops.tdm_r1.velocity_target_mse(xr, nr, vr, cx, cn, sq_sum)
    return sq_sum / max(D, 1)


def velocity_target_mse_bwd(
    g: Tensor, x: Tensor, noise: Tensor, v_pred: Tensor, cx: Tensor, cn: Tensor, backend: str
) -> Tensor:
    """Gradient wrt v_pred for upstream per-sample gradient g [B], in v_pred's shape and dtype."""
    xr, nr, vr, dtype = _prepare(x, noise, v_pred, backend)
    B, D = vr.shape
    scale = (g.float() * (2.0 / max(D, 1))).contiguous()
    grad = alloc(vr.shape, dtype, v_pred.device)
    if backend == "triton":
        BLOCK = block_for(D)
        _velocity_target_mse_bwd_kernel[(triton.cdiv(D, BLOCK), B)](
            xr, nr, vr, cx, cn, scale, grad, D, BLOCK=BLOCK, **launch_opts()
        )
    else:
        torch.ops.tdm_r1.velocity_target_mse_backward(xr, nr, vr, cx, cn, scale, grad)
    return grad.view(v_pred.shape).to(v_pred.dtype)


class VelocityTargetMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, noise, v_pred, cx, cn, backend):
        ctx.save_for_backward(x, noise, v_pred, cx, cn)
        ctx.backend = backend
        return velocity_target_mse_fwd(x, noise, v_pred, cx, cn, backend)

    @staticmethod
    def backward(ctx, g):
        x, noise, v_pred, cx, cn = ctx.saved_tensors
        grad = velocity_target_mse_bwd(g, x, noise, v_pred, cx, cn, ctx.backend) if ctx.needs_input_grad[2] else None
        return None, None, grad, None, None, None


def fused_velocity_target_mse(
    x: Tensor,
    noise: Tensor,
    s: Tensor | float,
    tau: Tensor | float,
    v_pred: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Per-sample mean (v* - v_pred)^2, fp32 [B]; differentiable wrt v_pred only.

    x [B, ...]: the stored state at s; noise [B, ...]: the draw n that re-noised it, x_tau = a x + b n;
    v_pred [B, ...]: the model's velocity at (x_tau, tau); s, tau: float or [B] with 0 <= s < tau <= 1.
    v* = -x/(1-s) + (n/b)(tau + s^2 a/(1-s)) with a, b from `renoise_coefficients(s, tau)`.
    """
    backend = resolve_backend(v_pred.device, backend, compute_dtype(x, noise, v_pred))
    if backend == "reference":
        return velocity_target_mse_ref(x, noise, s, tau, v_pred)
    cx, cn = velocity_target_coefficients(s, tau, x.shape[0], x.device)
    return VelocityTargetMSEFunction.apply(x, noise, v_pred, cx, cn, backend)
