"""fused_velocity_target_mse (forward and gradient wrt v_pred) against the fp32 reference."""

import torch
from utils import assert_close, dims_numel, fp32_leaf, leaf, make

from tdm_r1_kernels import fused_velocity_target_mse
from tdm_r1_kernels.reference import velocity_target_coefficients, velocity_target_mse_ref


def levels(B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.rand(B) * 0.8
    tau = s + 0.05 + (0.95 - s) * torch.rand(B)
    s[0] = 0.0
    return s.to(device), tau.to(device)


def test_velocity_target_mse(backend, dtype, shape):
    name, device = backend
    dims, contiguous = shape
    interp = name == "triton" and device.type == "cpu"
    s, tau = levels(dims[0], device)
    x, n, v = (make(dims, dtype, device, contiguous) for _ in range(3))
    vl = leaf(v)
    loss = fused_velocity_target_mse(x, n, s, tau, vl, backend=name)
    vr = fp32_leaf(v)
    ref = velocity_target_mse_ref(x.float(), n.float(), s, tau, vr)
    assert loss.dtype == torch.float32 and loss.shape == (dims[0],)
    assert_close("l", loss, ref, "reduce", dtype, interp)
    g = torch.rand(dims[0], device=device) * dims_numel(dims)  # loss scale: keeps fp16 grads (~2/D) normal
    (gv,) = torch.autograd.grad(loss, vl, g)
    (gv_ref,) = torch.autograd.grad(ref, vr, g)
    assert gv.dtype == dtype
    assert_close("grad_v_pred", gv, gv_ref, "store", dtype, interp)


def test_target_at_s0_is_eps_minus_x0(backend):
    """At s = 0 the stored state is x0 and v* = n - x exactly (eps - x0)."""
    name, device = backend
    x, n, v = (make((3, 257), torch.float32, device) for _ in range(3))
    loss = fused_velocity_target_mse(x, n, 0.0, torch.tensor([0.2, 0.55, 1.0], device=device), v, backend=name)
    expected = ((n - x) - v).square().mean(1)
    assert_close("l(s=0)", loss, expected, "reduce", torch.float32)


def test_target_is_the_conditional_path_velocity():
    """v* = d/dtau [a(tau) x + b(tau) n] at fixed (x, n): the velocity of the re-noising path conditioned on x_s = x.

    Checked against central finite differences in fp64: cx = da/dtau, cn = db/dtau.
    """
    s = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.75], dtype=torch.float64)
    tau = torch.tensor([0.5, 0.2, 0.7, 0.95, 0.8], dtype=torch.float64)
    a = lambda t: (1 - t) / (1 - s)
    b = lambda t: torch.sqrt(t**2 - (a(t) * s) ** 2)
    h = 1e-6
    cx, cn = velocity_target_coefficients(s, tau, 5, torch.device("cpu"))
    assert torch.allclose(cx.double(), (a(tau + h) - a(tau - h)) / (2 * h), rtol=1e-6)
    assert torch.allclose(cn.double(), (b(tau + h) - b(tau - h)) / (2 * h), rtol=1e-6)
    assert cx[0] == -1.0 and cn[0] == 1.0  # s = 0: v* = n - x exactly
