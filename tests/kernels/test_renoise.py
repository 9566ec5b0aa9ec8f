"""fused_renoise against the fp32 reference, including the s = 0, s = tau and s = 1 edges."""

import math

import torch
from utils import assert_close, fp32_leaf, leaf, make

from tdm_r1_kernels import fused_renoise
from tdm_r1_kernels.reference import renoise_coefficients, renoise_ref


def noise_levels(B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.rand(B) * 0.9
    tau = s + (1 - s) * torch.rand(B)
    if B >= 5:
        s[1], s[2], tau[2], s[3], tau[3] = 0.0, 1.0, 1.0, 0.4, 0.4
    return s.to(device), tau.to(device)


def test_renoise(backend, dtype, shape):
    name, device = backend
    dims, contiguous = shape
    interp = name == "triton" and device.type == "cpu"
    s, tau = noise_levels(dims[0], device)
    x, n = make(dims, dtype, device, contiguous), make(dims, dtype, device, contiguous)
    xl, nl = leaf(x), leaf(n)
    x_tau, a, b = fused_renoise(xl, nl, s, tau, backend=name)
    xr, nr = fp32_leaf(x), fp32_leaf(n)
    ref, a_ref, b_ref = renoise_ref(xr, nr, s, tau)
    assert x_tau.dtype == dtype
    assert_close("x_tau", x_tau, ref, "store", dtype, interp)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
    g = make(dims, dtype, device)
    gx, gn = torch.autograd.grad(x_tau, (xl, nl), g)
    gx_ref, gn_ref = torch.autograd.grad(ref, (xr, nr), g.float())
    assert_close("grad_x", gx, gx_ref, "store", dtype, interp)
    assert_close("grad_noise", gn, gn_ref, "store", dtype, interp)


def test_renoise_coefficients_edges():
    s = torch.tensor([0.0, 0.5, 1.0, 0.3])
    tau = torch.tensor([0.6, 0.5, 1.0, 0.9])
    a, b = renoise_coefficients(s, tau, 4, torch.device("cpu"))
    assert math.isclose(a[0].item(), 0.4, rel_tol=1e-7) and math.isclose(
        b[0].item(), 0.6, rel_tol=1e-7
    )  # s = 0: a = 1 - tau, b = tau
    assert a[1] == 1.0 and b[1] == 0.0  # tau = s: identity
    assert a[2] == 1.0 and b[2] == 0.0  # s = 1 (limit)
    # x = (1-s) x0 + s eps re-noised to tau: the x0 coefficient becomes 1 - tau, the noise std tau
    assert math.isclose(a[3].item() * 0.7, 0.1, rel_tol=1e-6)
    assert math.isclose((a[3].item() * 0.3) ** 2 + b[3].item() ** 2, 0.9**2, rel_tol=1e-6)


def test_renoise_out_buffer(backend):
    name, device = backend
    x, n = make((3, 77), torch.bfloat16, device), make((3, 77), torch.bfloat16, device)
    s, tau = torch.tensor([0.0, 0.3, 0.5], device=device), torch.tensor([0.4, 0.6, 0.9], device=device)
    buf = torch.full((3, 77), float("nan"), dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        expected, _, _ = fused_renoise(x, n, s, tau, backend=name)
        got, a, b = fused_renoise(x, n, s, tau, out=buf, backend=name)
    assert got is buf and torch.equal(got, expected)
