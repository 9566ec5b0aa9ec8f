"""fused_revised_x0_loss (loss, terms, gradient wrt x0_hat) against the fp32 reference."""

import pytest
import torch
from utils import assert_close, dims_numel, fp32_leaf, leaf, make

from tdm_r1_kernels import fused_revised_x0_loss
from tdm_r1_kernels.reference import REVISED_X0_EPS, revised_x0_loss_ref, revised_x0_weights


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
    weights = torch.rand(B, 3, device=device) + 0.1  # per-sample weights, every column distinct
    if not with_reward:
        t_rew = r_rew = None
    xl = leaf(x0)
    loss, terms = fused_revised_x0_loss(xl, t_kl, t_cfg, t_rew, r_real, r_rew, weights, backend=name)
    xr = fp32_leaf(x0)
    up = lambda t: None if t is None else t.float()
    ref, ref_terms = revised_x0_loss_ref(xr, up(t_kl), up(t_cfg), up(t_rew), up(r_real), up(r_rew), weights)
    assert loss.dtype == torch.float32 and loss.shape == (B,) and not terms.requires_grad
    assert_close("loss", loss, ref, "reduce", dtype, interp)
    assert_close("terms", terms, ref_terms, "reduce", dtype, interp)
    g = torch.rand(B, device=device) * dims_numel(dims)  # loss scale: keeps fp16 grads (~2/D) normal
    (gx,) = torch.autograd.grad(loss, xl, g)
    (gx_ref,) = torch.autograd.grad(ref, xr, g)
    assert gx.dtype == dtype
    assert_close("grad_x0_hat", gx, gx_ref, "store", dtype, interp)


def test_weights_are_the_callers():
    """One (w_kl, w_cfg, w_reward) for every sample, or one row per sample; applied exactly as given."""
    cpu = torch.device("cpu")
    assert torch.equal(revised_x0_weights((0.3, 0.3, 0.0), 2, cpu), torch.tensor([[0.3, 0.3, 0.0]] * 2))
    rows = torch.tensor([[1.0, 0.3, 0.7], [0.3, 0.3, 0.0]])
    assert torch.equal(revised_x0_weights(rows, 2, cpu), rows)
    with pytest.raises(ValueError, match="shape"):
        revised_x0_weights(rows, 3, cpu)
    with pytest.raises(ValueError, match="w_reward = 0.7 needs target_reward"):
        revised_x0_weights((1.0, 0.3, 0.7), 2, cpu, with_reward=False)


@pytest.mark.parametrize(
    "weights", [(1.0, 0.3, 0.7), (0.3, 0.3, 0.0), (1.0, 0.3, 0.0)], ids=["tdm-r1", "truncated-or-distill", "direct-rl"]
)
def test_loss_by_hand(backend, weights):
    """One sample computed term by term with the weights of each training mode; the normalisers take no gradient."""
    name, device = backend
    w_kl, w_cfg, w_rew = weights
    x0 = make((1, 300), torch.float32, device)
    t_kl, t_cfg, t_rew, r_real, r_rew = (x0 + 0.2 * make((1, 300), torch.float32, device) for _ in range(5))
    xl = leaf(x0)
    loss, terms = fused_revised_x0_loss(xl, t_kl, t_cfg, t_rew, r_real, r_rew, weights, backend=name)
    n_real = (x0 - r_real).abs().mean() + REVISED_X0_EPS
    n_rew = (x0 - r_rew).abs().mean() + REVISED_X0_EPS
    l_kl, l_cfg = (x0 - t_kl).square().mean() / n_real, (x0 - t_cfg).square().mean() / n_real
    l_rew = (x0 - t_rew).square().mean() / n_rew
    assert_close("terms", terms[0], torch.stack([l_kl, l_cfg, l_rew]), "reduce", torch.float32)
    assert_close("loss", loss, (w_kl * l_kl + w_cfg * l_cfg + w_rew * l_rew).view(1), "reduce", torch.float32)
    (gx,) = torch.autograd.grad(loss.sum(), xl)
    expected = (2 / 300) * (w_kl * (x0 - t_kl) / n_real + w_cfg * (x0 - t_cfg) / n_real + w_rew * (x0 - t_rew) / n_rew)
    assert_close("grad_x0_hat", gx, expected, "store", torch.float32)


def test_without_reward_target_the_reward_weight_must_be_zero(backend):
    name, device = backend
    x0, t_kl, t_cfg, r_real = (make((2, 40), torch.float32, device) for _ in range(4))
    with pytest.raises(ValueError, match="w_reward = 0.7 needs target_reward"):
        fused_revised_x0_loss(x0, t_kl, t_cfg, None, r_real, None, (1.0, 0.3, 0.7), backend=name)


def test_without_reward_target_the_reward_term_is_zero(backend):
    """L_reward = 0 (not 0/0) without a reward target, even with eps = 0; loss and gradient stay finite."""
    name, device = backend
    x0 = make((2, 40), torch.float32, device)
    t_kl, t_cfg, r_real = (x0 + 0.3 * make((2, 40), torch.float32, device) for _ in range(3))
    xl = leaf(x0)
    loss, terms = fused_revised_x0_loss(xl, t_kl, t_cfg, None, r_real, None, (0.3, 0.3, 0.0), eps=0.0, backend=name)
    assert torch.equal(terms[:, 2], torch.zeros(2, device=device))
    ref, _ = revised_x0_loss_ref(fp32_leaf(x0), t_kl, t_cfg, None, r_real, None, (0.3, 0.3, 0.0), eps=0.0)
    assert_close("loss", loss, ref, "reduce", torch.float32)
    (gx,) = torch.autograd.grad(loss.sum(), xl)
    assert torch.isfinite(gx).all()
