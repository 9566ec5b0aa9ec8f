"""fused_revised_x0_loss (loss, terms, gradient wrt x0_hat) against the fp32 reference."""

import pytest
import torch
from utils import assert_close, dims_numel, fp32_leaf, leaf, make

from kernels import fused_revised_x0_loss
from kernels.reference import REVISED_X0_EPS, revised_x0_loss_ref, revised_x0_weights


@pytest.mark.parametrize("with_reward", [True, False], ids=["reward", "no-reward"])
def test_revised_x0_loss(backend, dtype, shape, with_reward):
    name, device = backend
    dims, contiguous = shape
    interp = name == "triton" and device.type == "cpu"
    B = dims[0]
    x0 = make(dims, dtype, device, contiguous)
    # targets are x0_hat plus a correction; references sit at a distance so the normalisers differ per sample
    t_kl, t_cfg, t_rew, r_real, r_rew = (
        (x0.float() + make(dims, torch.float32, device, contiguous, scale=0.1 * (k + 1))).to(dtype) for k in range(5)
    )
    if not with_reward:
        t_rew = r_rew = None
    truncated = torch.rand(B, device=device) < 0.5
    xl = leaf(x0)
    loss, terms = fused_revised_x0_loss(xl, t_kl, t_cfg, t_rew, r_real, r_rew, truncated, 0.3, backend=name)
    xr = fp32_leaf(x0)
    up = lambda t: None if t is None else t.float()
    ref, ref_terms = revised_x0_loss_ref(xr, up(t_kl), up(t_cfg), up(t_rew), up(r_real), up(r_rew), truncated, 0.3)
    assert loss.dtype == torch.float32 and loss.shape == (B,) and not terms.requires_grad
    assert_close("loss", loss, ref, "reduce", dtype, interp)
    assert_close("terms", terms, ref_terms, "reduce", dtype, interp)
    g = torch.rand(B, device=device) * dims_numel(dims)  # loss scale: keeps fp16 grads (~2/D) normal
    (gx,) = torch.autograd.grad(loss, xl, g)
    (gx_ref,) = torch.autograd.grad(ref, xr, g)
    assert gx.dtype == dtype
    assert_close("grad_x0_hat", gx, gx_ref, "store", dtype, interp)


def test_weights_follow_the_design():
    """L = w_tdm L_cfg + (1 - w_tdm) L_reward + L_kl; for j >= trunc_steps, L = w_tdm (L_cfg + L_kl)."""
    w = revised_x0_weights(torch.tensor([False, True]), 0.3, 2, torch.device("cpu"))
    assert torch.allclose(w, torch.tensor([[1.0, 0.3, 0.7], [0.3, 0.3, 0.0]]))
    w = revised_x0_weights(False, 0.3, 1, torch.device("cpu"), with_reward=False)
    assert torch.allclose(w, torch.tensor([[1.0, 0.3, 0.0]]))


def test_loss_by_hand(backend):
    """One sample computed term by term; the normalisers take no gradient."""
    name, device = backend
    x0 = make((1, 300), torch.float32, device)
    t_kl, t_cfg, t_rew, r_real, r_rew = (x0 + 0.2 * make((1, 300), torch.float32, device) for _ in range(5))
    xl = leaf(x0)
    loss, terms = fused_revised_x0_loss(xl, t_kl, t_cfg, t_rew, r_real, r_rew, False, 0.3, backend=name)
    n_real = (x0 - r_real).abs().mean() + REVISED_X0_EPS
    n_rew = (x0 - r_rew).abs().mean() + REVISED_X0_EPS
    l_kl, l_cfg = (x0 - t_kl).square().mean() / n_real, (x0 - t_cfg).square().mean() / n_real
    l_rew = (x0 - t_rew).square().mean() / n_rew
    assert_close("terms", terms[0], torch.stack([l_kl, l_cfg, l_rew]), "reduce", torch.float32)
    assert_close("loss", loss, (0.3 * l_cfg + 0.7 * l_rew + l_kl).view(1), "reduce", torch.float32)
    (gx,) = torch.autograd.grad(loss.sum(), xl)
    expected = (2 / 300) * ((x0 - t_kl) / n_real + 0.3 * (x0 - t_cfg) / n_real + 0.7 * (x0 - t_rew) / n_rew)
    assert_close("grad_x0_hat", gx, expected, "store", torch.float32)
