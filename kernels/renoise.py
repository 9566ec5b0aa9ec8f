"""Re-noising to a higher noise level: x_tau = a x + b n, a = (1 - tau)/(1 - s), b = sqrt(tau^2 - (a s)^2).

(a, b) per sample come from `tdm_r1_kernels.reference.renoise_coefficients` (limits at s = 1 and tau = s are
documented there). Backward is linear: grad_x = a g, grad_n = b g. Where re-noising directly follows a
sampler step, `fused_sampler_step(..., noise=, tau=)` does both in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import block_for, check_like, check_out, compute_dtype, launch_opts, out_rows, rows, tl, triton
from .dispatch import resolve_backend
from .reference import renoise_coefficients, renoise_ref

__all__ = ["RenoiseFunction", "fused_renoise", "renoise_bwd", "renoise_fwd"]


@triton.jit
def _renoise_fwd_kernel(x_ptr, noise_ptr, a_ptr, b_ptr, out_ptr, D, BLOCK: tl.constexpr):
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    a = tl.load(a_ptr + i_b)
    b = tl.load(b_ptr + i_b)
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + o, (a * x + b * n).to(out_ptr.dtype.element_ty), mask=m_d)


def renoise_fwd(x: Tensor, noise: Tensor, a: Tensor, b: Tensor, backend: str, out: Tensor | None = None) -> Tensor:
    """x_tau [B, ...] in x's dtype from fp32 per-sample a, b [B]; written into `out` when given."""
    check_like("noise", noise, x)
    if out is not None:
        check_out("out", out, x)
    dtype = x.dtype if backend == "triton" else compute_dtype(x, noise)
    xr, nr = rows(x, backend, dtype), rows(noise, backend, dtype)
    B, D = xr.shape
    (buf,) = out_rows(None if out is None else (out,), 1, (B, D), dtype, x.device)
    if backend == "triton":
        BLOCK = block_for(D)
        _renoise_fwd_kernel[(triton.cdiv(D, BLOCK), B)](xr, nr, a, b, buf, D, BLOCK=BLOCK, **launch_opts())
    else:
        torch.ops.tdm_r1.renoise(xr, nr, a, b, buf)
    if out is not None:
        return out if buf.data_ptr() == out.data_ptr() else out.copy_(buf.view(x.shape))
    return buf.view(x.shape).to(x.dtype)


def renoise_bwd(g: Tensor, coef: Tensor, dtype: torch.dtype) -> Tensor:
    """coef[i] * g[i] in `dtype` (grad_x with coef = a, grad_noise with coef = b)."""
    return (g.float() * coef.view(-1, *([1] * (g.dim() - 1)))).to(dtype)


class RenoiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, noise, a, b, backend):
        ctx.save_for_backward(a, b)
        ctx.dtypes = (x.dtype, noise.dtype)
        return renoise_fwd(x, noise, a, b, backend)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        grad_x = renoise_bwd(g, a, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_n = renoise_bwd(g, b, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_n, None, None, None


def fused_renoise(
    x: Tensor,
    noise: Tensor,
    s: Tensor | float,
    tau: Tensor | float,
    *,
    out: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Re-noise x (a state at s) to tau >= s: returns (x_tau [B, ...] in x's dtype, a [B], b [B]).

    a, b are fp32 (float64 for float64 inputs, which run the float64 reference).

    x, noise [B, ...]; s, tau float or [B]. Gradients flow to x and noise. `out`: a contiguous buffer of x's
    shape and dtype to write x_tau into, only without autograd.
    """
    if out is not None and torch.is_grad_enabled() and (x.requires_grad or noise.requires_grad):
        raise ValueError("out= writes outside autograd: use it under torch.no_grad()")
    if out is not None:
        check_out("out", out, x)
    backend = resolve_backend(x.device, backend, compute_dtype(x, noise))
    if backend == "reference":
        x_tau, a, b = renoise_ref(x, noise, s, tau)
        return (x_tau if out is None else out.copy_(x_tau)), a, b
    a, b = renoise_coefficients(s, tau, x.shape[0], x.device)
    if out is not None:
        return renoise_fwd(x, noise, a, b, backend, out), a, b
    return RenoiseFunction.apply(x, noise, a, b, backend), a, b
