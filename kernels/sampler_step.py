"""Few-step sampler update: x0_hat = x - s v, x_next = x - (s - s_next) v [+ c2 (x0_prev - x0_hat)] [, x_tau].

The optional DPM-Solver++(2M) term and its coefficient c2 are derived in
`tdm_r1_kernels.reference.sampler_step_coefficients`; the optional fused re-noising is x_tau = a x_next + b n with
(a, b) from `tdm_r1_kernels.reference.renoise_coefficients(s_next, tau)`, applied to the fp32 x_next.
Backward (s, s_next, s_prev are schedule constants, no gradient): with g_n = g_next + a g_tau,
grad_x = (1 - c2) g_n + g_x0, grad_v = (c2 s - dt) g_n - s g_x0, grad_x0_prev = c2 g_n, grad_noise = b g_tau.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._common import (
    alloc,
    block_for,
    check_like,
    check_out,
    compute_dtype,
    launch_opts,
    out_rows,
    rows,
    tl,
    triton,
)
from .dispatch import resolve_backend
from .reference import elementwise_dtype, renoise_coefficients, sampler_step_coefficients, sampler_step_ref

__all__ = ["SamplerStep", "SamplerStepFunction", "fused_sampler_step", "sampler_step_bwd", "sampler_step_fwd"]


@triton.jit
def _sampler_step_fwd_kernel(
    x_ptr, v_ptr, prev_ptr, noise_ptr, s_ptr, dt_ptr, c2_ptr, a_ptr, b_ptr, x_next_ptr, x0_hat_ptr, x_tau_ptr, D,
    HAS_PREV: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    s = tl.load(s_ptr + i_b)
    dt = tl.load(dt_ptr + i_b)
    x = tl.load(x_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    x0_hat = x - s * v
    x_next = x - dt * v
    if HAS_PREV:
        c2 = tl.load(c2_ptr + i_b)
        prev = tl.load(prev_ptr + o, mask=m_d, other=0.0).to(tl.float32)
        x_next += c2 * (prev - x0_hat)
    tl.store(x0_hat_ptr + o, x0_hat.to(x0_hat_ptr.dtype.element_ty), mask=m_d)
    tl.store(x_next_ptr + o, x_next.to(x_next_ptr.dtype.element_ty), mask=m_d)
    if HAS_TAU:
        a = tl.load(a_ptr + i_b)
        b = tl.load(b_ptr + i_b)
        n = tl.load(noise_ptr + o, mask=m_d, other=0.0).to(tl.float32)
        tl.store(x_tau_ptr + o, (a * x_next + b * n).to(x_tau_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _sampler_step_bwd_kernel(
    g_next_ptr, g_x0_ptr, g_tau_ptr, s_ptr, dt_ptr, c2_ptr, a_ptr, grad_x_ptr, grad_v_ptr, grad_prev_ptr, D,
    HAS_GN: tl.constexpr, HAS_G0: tl.constexpr, HAS_GTAU: tl.constexpr, HAS_C2: tl.constexpr,
    NEED_X: tl.constexpr, NEED_V: tl.constexpr, NEED_PREV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i_d = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    o = i_b * D + o_d
    s = tl.load(s_ptr + i_b)
    dt = tl.load(dt_ptr + i_b)
    c2 = 0.0
    if HAS_C2:
        c2 = tl.load(c2_ptr + i_b)
    g_n = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GN:
        g_n += tl.load(g_next_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    if HAS_GTAU:
        a = tl.load(a_ptr + i_b)
        g_n += a * tl.load(g_tau_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    g_0 = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_G0:
        g_0 = tl.load(g_x0_ptr + o, mask=m_d, other=0.0).to(tl.float32)
    if NEED_X:
        tl.store(grad_x_ptr + o, ((1.0 - c2) * g_n + g_0).to(grad_x_ptr.dtype.element_ty), mask=m_d)
    if NEED_V:
        tl.store(grad_v_ptr + o, ((c2 * s - dt) * g_n - s * g_0).to(grad_v_ptr.dtype.element_ty), mask=m_d)
    if NEED_PREV:
        tl.store(grad_prev_ptr + o, (c2 * g_n).to(grad_prev_ptr.dtype.element_ty), mask=m_d)


def sampler_step_fwd(
    x: Tensor,
    v: Tensor,
    s: Tensor,
    dt: Tensor,
    x0_prev: Tensor | None,
    c2: Tensor | None,
    noise: Tensor | None,
    a: Tensor | None,
    b: Tensor | None,
    backend: str,
    out: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launch the forward on [B, ...] tensors with fp32 [B] coefficients; outputs have x's shape and dtype.

    Mixed input dtypes: Triton loads each as is; the native op computes in the promoted dtype and rounds
    the outputs to x's dtype afterwards. `out` = (x_next, x0_hat[, x_tau]) buffers are written in place.
    """
    for name, t in (("v", v), ("x0_prev", x0_prev), ("noise", noise)):
        check_like(name, t, x)
    n_out = 3 if noise is not None else 2
    if out is not None:
        if len(out) != n_out:
            raise ValueError(f"out needs {n_out} tensors (x_next, x0_hat{', x_tau' if n_out == 3 else ''})")
        for name, o in zip(("x_next", "x0_hat", "x_tau"), out):
            check_out(f"out {name}", o, x)
    dtype = x.dtype if backend == "triton" else compute_dtype(x, v, x0_prev, noise)
    xr, vr, pr, nr = (rows(t, backend, dtype) for t in (x, v, x0_prev, noise))
    B, D = xr.shape
    x_next, x0_hat, *rest = out_rows(out, n_out, (B, D), dtype, x.device)
    x_tau = rest[0] if rest else None
    if backend == "triton":
        BLOCK = block_for(D)
        _sampler_step_fwd_kernel[(triton.cdiv(D, BLOCK), B)](
            xr, vr, xr if pr is None else pr, xr if nr is None else nr, s, dt, s if c2 is None else c2,
            s if a is None else a, s if b is None else b, x_next, x0_hat, x0_hat if x_tau is None else x_tau, D,
            HAS_PREV=pr is not None, HAS_TAU=nr is not None, BLOCK=BLOCK, **launch_opts(),
        )  # fmt: skip
    else:
        torch.ops.tdm_r1.sampler_step(xr, vr, s, dt, pr, c2, nr, a, b, x_next, x0_hat, x_tau)
    results = [None if t is None else t.view(x.shape) for t in (x_next, x0_hat, x_tau)]
    if out is not None:
        for o, r in zip(out, results):
            if r.data_ptr() != o.data_ptr():  # computed in a wider dtype: round into the caller's buffer
                o.copy_(r)
        return out[0], out[1], out[2] if n_out == 3 else None
    x_next, x0_hat, x_tau = (None if t is None else t.to(x.dtype) for t in results)
    return x_next, x0_hat, x_tau


def sampler_step_bwd(
    g_next: Tensor | None,
    g_x0: Tensor | None,
    g_tau: Tensor | None,
    s: Tensor,
    dt: Tensor,
    c2: Tensor | None,
    a: Tensor | None,
    need: tuple[bool, bool, bool],
    shape: torch.Size,
    dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (x, v, x0_prev) for the requested `need` flags, shaped `shape`, in `dtype`."""
    device = s.device
    B = shape[0]
    D = shape.numel() // max(B, 1)
    gn, g0, gt = (rows(t, backend, dtype) for t in (g_next, g_x0, g_tau))
    need_x, need_v, need_prev = need[0], need[1], need[2] and c2 is not None
    outs = [alloc((B, D), dtype, device) if n else None for n in (need_x, need_v, need_prev)]
    if any(o is not None for o in outs):
        if backend == "triton":
            BLOCK = block_for(D)
            dummy = next(o for o in outs if o is not None)
            _sampler_step_bwd_kernel[(triton.cdiv(D, BLOCK), B)](
                dummy if gn is None else gn, dummy if g0 is None else g0, dummy if gt is None else gt, s, dt,
                s if c2 is None else c2, s if a is None else a, *(dummy if o is None else o for o in outs), D,
                HAS_GN=gn is not None, HAS_G0=g0 is not None, HAS_GTAU=gt is not None, HAS_C2=c2 is not None,
                NEED_X=need_x, NEED_V=need_v, NEED_PREV=need_prev, BLOCK=BLOCK, **launch_opts(),
            )  # fmt: skip
        else:
            torch.ops.tdm_r1.sampler_step_backward(gn, g0, gt, s, dt, c2, a, *outs)
    grad_x, grad_v, grad_prev = (None if o is None else o.view(shape) for o in outs)
    return grad_x, grad_v, grad_prev


class SamplerStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, x0_prev, noise, s, dt, c2, a, b, backend):
        x_next, x0_hat, x_tau = sampler_step_fwd(x, v, s, dt, x0_prev, c2, noise, a, b, backend)
        ctx.save_for_backward(s, dt, c2, a, b)
        ctx.backend = backend
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.set_materialize_grads(False)  # unused outputs arrive as None and are skipped by the kernel
        return x_next, x0_hat, x_tau

    @staticmethod
    def backward(ctx, g_next, g_x0, g_tau):
        s, dt, c2, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_v, grad_prev = sampler_step_bwd(
            g_next, g_x0, g_tau, s, dt, c2, a, need[:3], ctx.shape, ctx.dtype, ctx.backend
        )
        grad_noise = None
        if need[3] and g_tau is not None:
            grad_noise = (g_tau.float() * b.view(-1, *([1] * (g_tau.dim() - 1)))).to(ctx.dtype)
        return grad_x, grad_v, grad_prev, grad_noise, None, None, None, None, None, None


class SamplerStep(NamedTuple):
    """x_next, x0_hat [B, ...] in x's dtype; x_tau [B, ...] and a, b [B] (fp32; float64 for float64 inputs) when
    re-noising was requested."""

    x_next: Tensor
    x0_hat: Tensor
    x_tau: Tensor | None = None
    a: Tensor | None = None
    b: Tensor | None = None


def fused_sampler_step(
    x: Tensor,
    v: Tensor,
    s: Tensor | float,
    s_next: Tensor | float,
    *,
    x0_prev: Tensor | None = None,
    s_prev: Tensor | float | None = None,
    noise: Tensor | None = None,
    tau: Tensor | float | None = None,
    out: tuple[Tensor, ...] | None = None,
    backend: str | None = None,
) -> SamplerStep:
    """One deterministic sampler step from s to s_next, optionally re-noised to tau, in one pass.

    x, v [B, ...] (any float dtype; outputs take x's dtype); s, s_next, s_prev, tau: float or [B].
    x0_prev + s_prev select DPM-Solver++(2M) (x0_prev is the previous step's x0_hat); noise + tau add the
    fused x_tau = a x_next + b noise. Gradients flow to x, v, x0_prev and noise. The rollout (no grad) and
    training (grad) paths run the same kernel, so their outputs agree bit for bit.
    out = (x_next, x0_hat[, x_tau]): contiguous buffers of x's shape and dtype written in place (e.g. the
    rollout's trajectory storage); only without autograd, since the buffers are not part of the graph.
    """
    if (x0_prev is None) != (s_prev is None):
        raise ValueError("DPM-Solver++(2M) needs both x0_prev and s_prev")
    if (noise is None) != (tau is None):
        raise ValueError("re-noising needs both noise and tau")
    if out is not None:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, v, x0_prev, noise)):
            raise ValueError("out= writes outside autograd: use it under torch.no_grad() (rollouts)")
        if len(out) != (3 if noise is not None else 2):
            raise ValueError("out holds (x_next, x0_hat), plus x_tau when re-noising")
        for name, o in zip(("x_next", "x0_hat", "x_tau"), out):
            check_out(f"out {name}", o, x)
    backend = resolve_backend(x.device, backend, compute_dtype(x, v, x0_prev, noise))
    B = x.shape[0]
    a = b = None
    if noise is not None:
        a, b = renoise_coefficients(s_next, tau, B, x.device, elementwise_dtype(x, v, x0_prev, noise))
    if backend == "reference":
        results = sampler_step_ref(x, v, s, s_next, x0_prev, s_prev, noise, tau)
        if out is not None:
            results = tuple(o.copy_(r) for o, r in zip(out, results)) + (None,) * (3 - len(out))
        return SamplerStep(*results, a, b)
    s32, dt, c2 = sampler_step_coefficients(s, s_next, B, x.device, s_prev)
    if out is not None:
        x_next, x0_hat, x_tau = sampler_step_fwd(x, v, s32, dt, x0_prev, c2, noise, a, b, backend, out)
    else:
        x_next, x0_hat, x_tau = SamplerStepFunction.apply(x, v, x0_prev, noise, s32, dt, c2, a, b, backend)
    return SamplerStep(x_next, x0_hat, x_tau, a, b)
