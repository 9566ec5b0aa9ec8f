"""TDM losses against hand-computed tiny cases (values and gradients), through the fused ops the trainers call."""

import math

import pytest
import torch

from tdm_r1.losses import (
    fake_score_loss,
    generator_targets,
    generator_term_weights,
    sample_tau,
    unshift_time,
    x0_from_velocity,
)
from tdm_r1.sampling import shift_time
from tdm_r1_kernels import fused_renoise, fused_revised_x0_loss


def t(*rows):
    """[B, 1, 1, N] tensor from per-sample lists (image-like, so per-sample means run over 3 dims)."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, None, :]


def test_renoise_hand_case():
    # s = 0.5, tau = 0.75: a = 0.25 / 0.5 = 0.5, b = sqrt(0.75^2 - 0.25^2) = sqrt(0.5)
    x_tau, a, b = fused_renoise(t([2.0, -4.0]), t([1.0, 3.0]), 0.5, 0.75)
    r = math.sqrt(0.5)
    assert a.tolist() == [0.5] and b.item() == pytest.approx(r)
    assert x_tau.flatten().tolist() == pytest.approx([1.0 + r, -2.0 + 3 * r])


def test_renoise_from_clean_sample_is_plain_noising():
    # s = 0: a = 1 - tau, b = tau, i.e. the forward process itself
    x, n = torch.randn(3, 1, 2, 5), torch.randn(3, 1, 2, 5)
    tau = torch.tensor([0.1, 0.5, 1.0])
    x_tau, a, b = fused_renoise(x, n, torch.zeros(3), tau)
    assert torch.allclose(x_tau, (1 - tau.view(-1, 1, 1, 1)) * x + tau.view(-1, 1, 1, 1) * n)


def test_sample_tau_range_and_margin():
    gen = torch.Generator().manual_seed(0)
    s_lo = torch.tensor([0.0, 0.5, 0.75, 0.9]).repeat(2000)
    tau = sample_tau(s_lo, 0.02, 3.0, gen)
    u = unshift_time(tau.double(), 3.0)
    assert (tau > s_lo).all() and (tau <= 1).all()
    assert (u >= unshift_time(s_lo.double(), 3.0) + 0.02 - 1e-6).all()
    # uniform in pre-shift time: for s_lo = 0 the mean of u is (0.02 + 1) / 2
    assert u[s_lo == 0].mean().item() == pytest.approx(0.51, abs=0.02)
    assert torch.allclose(shift_time(unshift_time(s_lo, 3.0), 3.0), s_lo)


def test_x0_from_velocity():
    x, v = t([1.0, 2.0]), t([0.5, -1.0])
    assert x0_from_velocity(x, torch.tensor([0.4]), v).flatten().tolist() == pytest.approx([0.8, 2.4])


def test_fake_score_loss_hand_case():
    # target (x_tau - x0_hat) / tau = ([1, 2] - [0, 1]) / 0.5 = [2, 2]
    x_tau, x0_hat, v_real = t([1.0, 2.0]), t([0.0, 1.0]), t([2.0, 2.0])
    v_fake = t([1.0, 3.0]).requires_grad_(True)
    loss, parts = fake_score_loss(x_tau, torch.tensor([0.5]), x0_hat, v_fake, v_real, reg=0.02)
    # dsm = mean(1^2, 1^2) = 1; reg term = mean(1^2, 1^2) = 1
    assert parts["dsm"].tolist() == [1.0] and parts["reg"].tolist() == [1.0]
    assert loss.item() == pytest.approx(1.02)
    loss.backward()
    # d/dv mean((g - v)^2) + 0.02 mean((r - v)^2) = -(g - v) - 0.02 (r - v) per element (2 elements)
    assert v_fake.grad.flatten().tolist() == pytest.approx([-1.02, 1.02])


def test_fake_score_loss_is_batch_mean_of_per_sample_terms():
    x_tau, x0_hat, v_real = t([1.0, 2.0], [0.0, 0.0]), t([0.0, 1.0], [1.0, 1.0]), t([2.0, 2.0], [0.0, 0.0])
    v_fake = t([1.0, 3.0], [0.0, 0.0])
    loss, parts = fake_score_loss(x_tau, torch.tensor([0.5, 0.25]), x0_hat, v_fake, v_real, reg=0.0)
    # sample 2: target = (0 - 1) / 0.25 = -4 everywhere, v_fake = 0 -> dsm 16
    assert parts["dsm"].tolist() == [1.0, 16.0] and loss.item() == pytest.approx(8.5)


def test_generator_term_weights():
    assert generator_term_weights(0, 4, 0.3, with_reward=True) == (1.0, 0.3, pytest.approx(0.7))
    assert generator_term_weights(2, 2, 0.3, with_reward=True) == (0.3, 0.3, 0.0)
    assert generator_term_weights(0, 4, 0.3, with_reward=False) == (0.3, 0.3, 0.0)
    assert generator_term_weights(3, 2, 0.3, with_reward=False) == (0.3, 0.3, 0.0)


def test_generator_targets_hand_case():
    x0_hat, c, u, f = t([1.0, 1.0]), t([2.0, 0.0]), t([1.0, 0.0]), t([1.5, 1.0])
    out = generator_targets(x0_hat, c, u, f, cfg=4.5)
    assert out["target_kl"].flatten().tolist() == [1.5, 0.0]  # 1 + (c - f)
    assert out["target_cfg"].flatten().tolist() == [4.5, 1.0]  # 1 + 3.5 (c - u)
    assert out["ref_real"].flatten().tolist() == [5.5, 0.0]  # u + 4.5 (c - u)
    assert out["target_reward"] is None
    out = generator_targets(x0_hat, c, u, f, 4.5, x0_sur_cfg=t([3.0, 0.0]), x0_ref=t([2.0, 1.0]))
    assert out["target_reward"].flatten().tolist() == [2.0, 0.0]  # 1 + (sur - ref)
    assert out["ref_reward"].flatten().tolist() == [3.0, 0.0]


def test_revised_x0_loss_distill_hand_case():
    x0_hat = t([1.0, 3.0]).requires_grad_(True)
    # L_kl = mean((1-2)^2, 0) / mean(|1-0|, |3-1|) = 0.5 / 1.5; L_cfg = mean(0, (3-5)^2) / 1.5 = 2 / 1.5
    loss, terms = fused_revised_x0_loss(
        x0_hat, t([2.0, 3.0]), t([1.0, 5.0]), None, t([0.0, 1.0]), None, (0.3, 0.3, 0.0), eps=0.0
    )
    assert terms[0].tolist() == pytest.approx([1 / 3, 4 / 3, 0.0])
    assert loss.item() == pytest.approx(0.3 * 5 / 3)
    loss.sum().backward()
    # d/dx of w_kl mean((x - t_kl)^2)/w + w_cfg mean((x - t_cfg)^2)/w = 0.3 * ((x - t_kl) + (x - t_cfg)) / 1.5
    assert x0_hat.grad.flatten().tolist() == pytest.approx([-0.2, -0.4])


def test_revised_x0_loss_reward_term_hand_case():
    x0_hat = t([1.0, 3.0]).requires_grad_(True)
    # reward: mean((1-0)^2, (3-3)^2) / mean(|1-2|, |3-3|) = 0.5 / 0.5 = 1
    loss, terms = fused_revised_x0_loss(
        x0_hat, t([2.0, 3.0]), t([1.0, 5.0]), t([0.0, 3.0]), t([0.0, 1.0]), t([2.0, 3.0]), (1.0, 0.3, 0.7), eps=0.0
    )
    assert terms[0].tolist() == pytest.approx([1 / 3, 4 / 3, 1.0])
    assert loss.item() == pytest.approx(1 / 3 + 0.3 * 4 / 3 + 0.7)


def test_revised_x0_loss_normaliser_has_no_gradient_and_eps():
    x0_hat = t([2.0, 2.0]).requires_grad_(True)
    loss, _ = fused_revised_x0_loss(
        x0_hat, t([2.0, 2.0]), t([2.0, 2.0]), None, t([2.0, 2.0]), None, (1, 1, 0), eps=1e-6
    )
    loss.sum().backward()  # x0_hat == ref: w = eps, finite, and the loss is exactly 0
    assert loss.item() == 0.0 and torch.equal(x0_hat.grad, torch.zeros_like(x0_hat))


@pytest.mark.parametrize(
    "j, with_reward, design",
    [
        (0, True, "L_kl + w_tdm L_cfg + (1 - w_tdm) L_reward"),  # TDM-R1, j < trunc_steps
        (2, True, "w_tdm (L_cfg + L_kl)"),  # TDM-R1, j >= trunc_steps
        (0, False, "w_tdm (L_cfg + L_kl)"),  # distillation: w_tdm applies to CFG and KL only, at every step
        (3, False, "w_tdm (L_cfg + L_kl)"),
    ],
)
def test_generator_loss_gets_the_design_weights_through_the_fused_op(j, with_reward, design):
    g = torch.Generator().manual_seed(1)
    x0_hat, t_kl, t_cfg, t_rew, r_real, r_rew = (torch.randn(3, 1, 4, 6, generator=g) for _ in range(6))
    if not with_reward:
        t_rew = r_rew = None
    weights = generator_term_weights(j, 2, 0.3, with_reward)
    loss, terms = fused_revised_x0_loss(x0_hat, t_kl, t_cfg, t_rew, r_real, r_rew, weights, eps=1e-6)
    l_kl, l_cfg, l_rew = terms.unbind(1)
    expected = {
        "L_kl + w_tdm L_cfg + (1 - w_tdm) L_reward": l_kl + 0.3 * l_cfg + 0.7 * l_rew,
        "w_tdm (L_cfg + L_kl)": 0.3 * (l_cfg + l_kl),
    }[design]
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert (l_rew > 0).all() == with_reward  # the reward term exists exactly when it is on
