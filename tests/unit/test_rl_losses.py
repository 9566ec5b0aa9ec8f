"""TDM-R1 pieces against hand-computed cases: advantages, the surrogate velocity target, the group
preference weights and gates, and the surrogate loss."""

import math

import pytest
import torch

from tdm_r1.advantages import group_advantages
from tdm_r1.losses import group_preference, surrogate_loss
from tdm_r1_kernels import fused_renoise, fused_velocity_target_mse


def test_group_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    g = torch.tensor([0, 0, 1, 1])
    # group means 0.5, 0.5; epoch std (population) of [1, 0, .5, .5] = sqrt(0.125)
    std = math.sqrt(0.125)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4)
    assert torch.allclose(group_advantages(r, g), expected, atol=1e-6)


def test_group_advantages_clip_nan_and_constant_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.3, 0.3])
    g = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g, clip=1.5)
    assert a[0] == pytest.approx(1.5)  # (1 - 1/8) / std ~ 2.6, clipped
    assert a[8] == 0.0  # NaN reward: excluded, zero advantage
    assert torch.all(a[9:] == 0)  # a group whose valid rewards agree carries no signal
    assert torch.all(group_advantages(torch.full((4,), float("nan")), torch.zeros(4, dtype=torch.long)) == 0)


def test_group_means_exclude_failed_samples():
    r = torch.tensor([1.0, float("nan"), 0.0])
    a = group_advantages(r, torch.zeros(3, dtype=torch.long), eps=0.0)
    assert torch.allclose(a, torch.tensor([1.0, 0.0, -1.0]))  # mean 0.5, std 0.5 over the two valid


def test_velocity_target_reduces_to_eps_minus_x0_at_s0():
    x0, n, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    s, tau = torch.zeros(3), torch.tensor([0.3, 0.6, 0.9])
    x_tau, a, b = fused_renoise(x0, n, s, tau)
    assert torch.allclose(x_tau, (1 - tau.view(3, 1, 1)) * x0 + tau.view(3, 1, 1) * n)
    # v* = n - x0: the loss of v_pred = n - x0 is 0, and of any other v_pred the plain mean squared error
    assert torch.allclose(fused_velocity_target_mse(x0, n, s, tau, n - x0), torch.zeros(3), atol=1e-12)
    expected = (n - x0 - v).square().flatten(1).mean(1)
    assert torch.allclose(fused_velocity_target_mse(x0, n, s, tau, v), expected, rtol=1e-6)


def test_velocity_target_hand_case_at_positive_s():
    x, n = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.5]])
    s, tau = torch.tensor([0.5]), torch.tensor([0.8])
    a = 0.2 / 0.5
    b = math.sqrt(0.64 - (a * 0.5) ** 2)
    v_star = [-xi / 0.5 + (ni / b) * (0.8 + 0.25 * a / 0.5) for xi, ni in ((2.0, 1.0), (-1.0, 0.5))]
    v_pred = torch.tensor([[1.5, -0.25]], requires_grad=True)
    l = fused_velocity_target_mse(x, n, s, tau, v_pred)
    assert l.item() == pytest.approx(((v_star[0] - 1.5) ** 2 + (v_star[1] + 0.25) ** 2) / 2, rel=1e-6)
    l.backward()  # d/dv mean((v* - v)^2) = (v - v*) (2 elements)
    assert v_pred.grad.flatten().tolist() == pytest.approx([1.5 - v_star[0], -0.25 - v_star[1]], rel=1e-6)


def _pref(l, l_ref, l_old, adv, gid, drift=0.0, G=2, beta=10.0, clip=0.1):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return group_preference(t(l), t(l_ref), t(l_old), t(adv), torch.tensor(gid), G, beta, clip, t(drift), 0.05)


def test_group_preference_weights_hand_case():
    # group 0: A = (+1, -1), l - l_ref = (-0.1, +0.2): S = (1*10*(-0.1) + (-1)*10*0.2) / 2 = -1.5
    # group 1: A = (+0.5, -0.5), l - l_ref = (0.1, 0.1): S = (0.5 - 0.5) * 10 * 0.1 / 2 = 0
    out = _pref([1.0, 1.2, 0.5, 0.5], [1.1, 1.0, 0.4, 0.4], [1.0, 1.2, 0.5, 0.5], [1, -1, 0.5, -0.5], [0, 0, 1, 1])
    s0 = 1 / (1 + math.exp(1.5))
    assert torch.allclose(out["weight"], torch.tensor([s0, s0, 0.5, 0.5]))
    assert torch.allclose(out["score"], torch.tensor([-1.5, -1.5, 0.0, 0.0]))
    assert not out["ppo_gate"].any() and out["keep"].all()  # l_old == l: ratio 1


def test_ppo_gate_hand_case():
    # ratio = exp(l_old - l); c = 0.1
    l = [1.0, 1.0, 1.0, 1.0]
    l_old = [1.2, 1.05, 0.8, 0.95]  # ratios e^.2=1.22, e^.05=1.05, e^-.2=0.82, e^-.05=0.95
    adv = [1.0, 1.0, -1.0, -1.0]
    out = _pref(l, l, l_old, adv, [0, 0, 1, 1])
    assert out["ppo_gate"].tolist() == [True, False, True, False]
    assert out["keep"].tolist() == [False, True, False, True]


def test_reference_gate_hand_case():
    # moved past the reference in the advantage direction: A > 0 and l < l_ref, or A <= 0 and l > l_ref
    args = ([1.0, 1.0, 1.0, 1.0], [1.1, 0.9, 0.9, 1.1], [1.0] * 4, [1.0, 1.0, -1.0, -1.0], [0, 0, 1, 1])
    low = _pref(*args, drift=0.01)
    assert not low["ref_gate"].any()  # drift below the threshold: gate off
    high = _pref(*args, drift=0.2)
    assert high["ref_gate"].tolist() == [True, False, True, False]


def test_group_score_is_summed_by_the_given_reducer():
    calls = []

    def reduce(partial):
        calls.append(partial.clone())
        return partial * 2  # e.g. the other rank holds an identical half

    t = torch.tensor
    out = group_preference(
        t([1.0, 2.0]),
        t([0.0, 0.0]),
        t([1.0, 2.0]),
        t([1.0, 1.0]),
        t([0, 0]),
        2,
        1.0,
        0.1,
        t(0.0),
        0.05,
        group_score_sum=reduce,
    )
    assert torch.allclose(calls[0], t([1.5]))
    assert torch.allclose(out["weight"], torch.sigmoid(t([3.0, 3.0])))


def test_surrogate_loss_hand_case_and_gradient():
    l = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    pref = {"weight": torch.tensor([0.5, 0.5, 0.25]), "keep": torch.tensor([True, True, False])}
    drift = torch.tensor(0.4, requires_grad=True)
    loss = surrogate_loss(l, adv, pref, drift, beta=1e-3, time_weight=0.75)
    expected = 0.75 * ((0.5 * 1 * 1 + 0.5 * -1 * 2 + 0) / 3 + 1e-3 * 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.allclose(l.grad, 0.75 * torch.tensor([0.5, -0.5, 0.0]) / 3)  # gated sample gets no gradient
    assert drift.grad.item() == pytest.approx(0.75e-3)
