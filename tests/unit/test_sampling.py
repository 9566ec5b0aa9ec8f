import math

import pytest
import torch

from tdm_r1.models.base import Cond
from tdm_r1.sampling import eta_ray_point, rollout, schedule, shift_time
from tdm_r1_kernels import fused_sampler_step


class GaussianFlow:
    """Exact rectified-flow velocity for x0 ~ N(mu, sigma^2 I): v(x, s) = E[eps - x0 | x_s = x].

    The marginal is x_s ~ N((1 - s) mu, c(s)^2 I) with c(s)^2 = (1 - s)^2 sigma^2 + s^2, and the ODE maps
    noise eps to mu + sigma * eps exactly."""

    def __init__(self, mu: float, sigma: float):
        self.mu, self.sigma = mu, sigma

    def velocity(self, x, s, cond):
        s = s.view(-1, *([1] * (x.dim() - 1))).double()
        c2 = (1 - s) ** 2 * self.sigma**2 + s**2
        r = x.double() - (1 - s) * self.mu
        e_x0 = self.mu + (1 - s) * self.sigma**2 / c2 * r
        e_eps = s / c2 * r
        return (e_eps - e_x0).to(x.dtype)


def empty_cond(b):
    return Cond({"tokens": torch.zeros(b, 1)}, {"tokens": torch.zeros(1, 1)})


def test_schedule_matches_design_points():
    assert torch.allclose(schedule(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(schedule(2, 1.0), torch.tensor([1.0, 0.5, 0.0]))
    u = torch.rand(100)
    assert torch.allclose(shift_time(u, 3.0), 3 * u / (1 + 2 * u))


def test_euler_step_closed_form():
    x, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    s, s_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.5, 0.0])
    x_next, x0_hat, *_ = fused_sampler_step(x, v, s, s_next)
    for i in range(3):
        assert torch.allclose(x_next[i], x[i] - (s[i] - s_next[i]) * v[i])
        assert torch.allclose(x0_hat[i], x[i] - s[i] * v[i])


def test_trajectory_holds_all_states_and_outputs():
    model = GaussianFlow(0.5, 0.3)
    noise = torch.randn(4, 1, 2, 3)
    traj = rollout(model, empty_cond(4), noise, steps=4, shift=3.0)
    assert traj.xs.shape == (5, 4, 1, 2, 3) and traj.v.shape == (4, 4, 1, 2, 3)
    assert torch.equal(traj.xs[0], noise) and torch.allclose(traj.s, schedule(4, 3.0))
    for k in range(4):  # each stored state follows from the previous one and the stored output
        expected = traj.xs[k] - (traj.s[k] - traj.s[k + 1]) * traj.v[k]
        assert torch.allclose(traj.xs[k + 1], expected, atol=1e-6)


def test_point_target_is_exact_for_any_step_count():
    # sigma -> 0: v = (x - mu) / s, and Euler on this field is exact.
    model = GaussianFlow(0.7, 0.0)
    noise = torch.randn(64, 8, dtype=torch.float64)
    out = rollout(model, empty_cond(64), noise, steps=4, shift=3.0).sample
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-12)


def _endpoint_error(model, noise, steps, solver):
    out = rollout(model, empty_cond(noise.shape[0]), noise, steps=steps, shift=3.0, solver=solver).sample
    return out, (out - (model.mu + model.sigma * noise)).abs().max().item()


@pytest.mark.parametrize("solver", ["euler", "dpmpp2m"])
@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_four_step_sampler_lands_on_gaussian_target(solver, sigma):
    # Few-step sampling of a curved flow contracts towards the mode (what distillation fixes), but
    # every sample must land inside the target: at most 3 sigma from mu, with the right mean.
    model = GaussianFlow(0.5, sigma)
    noise = torch.randn(4096, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, _ = _endpoint_error(model, noise, 4, solver)
    assert (out - 0.5).abs().max() < 3 * sigma
    assert abs(out.mean().item() - 0.5) < 0.01
    assert out.std().item() < sigma  # contraction, not blow-up


def test_samplers_converge_to_the_exact_ode_endpoint_at_their_order():
    model = GaussianFlow(0.5, 0.3)
    noise = torch.randn(1024, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    euler = [_endpoint_error(model, noise, k, "euler")[1] for k in (16, 32, 64)]
    dpm = [_endpoint_error(model, noise, k, "dpmpp2m")[1] for k in (32, 64)]
    # first order: doubling the steps halves the error; second order: quarters it
    assert 0.4 < euler[1] / euler[0] < 0.6 and 0.4 < euler[2] / euler[1] < 0.6
    assert dpm[1] / dpm[0] < 0.3
    assert dpm[1] < 0.2 * euler[2]


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_eta_step_is_the_renoised_ddim_step(eta):
    # x_next = (1 - s') x0_hat + s' (sqrt(1 - eta^2) eps_hat + eta n), eps_hat = x + (1 - s) v, fresh n per step
    # (none at the last step); float64 so the check is tight.
    model = GaussianFlow(0.5, 0.3)
    noise = torch.randn(8, 4, dtype=torch.float64)
    traj = rollout(model, empty_cond(8), noise, eta=eta, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for k in range(4):
        x, v, s, s_next = traj.xs[k], traj.v[k], float(traj.s[k]), float(traj.s[k + 1])
        x0_hat, eps_hat = x - s * v, x + (1 - s) * v
        if s_next > 0:
            n = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            expected = (1 - s_next) * x0_hat + s_next * (math.sqrt(1 - eta**2) * eps_hat + eta * n)
        else:
            expected = x0_hat
        assert torch.allclose(traj.xs[k + 1], expected, rtol=0, atol=1e-12), k
    assert eta_ray_point(0.5, 0.0) == 0.5 and eta_ray_point(0.5, 1.0) == 0.0


def test_dpmpp2m_step_is_the_textbook_update():
    # DPM-Solver++(2M), data prediction, alpha = 1 - s, sigma = s, lambda = log(alpha / sigma):
    # x_next = (s'/s) x - (1 - s') (e^{-h} - 1) D = (s'/s) x + (1 - s'/s) D, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,
    # h = lambda' - lambda, r = (lambda - lambda_prev) / h; first order (D = x0) without history (s_prev = 1)
    # and at s' = 0.
    model = GaussianFlow(0.5, 0.3)
    noise = torch.randn(8, 4, dtype=torch.float64)
    traj = rollout(model, empty_cond(8), noise, steps=6, shift=3.0, solver="dpmpp2m")
    s = traj.s.double()
    lam = lambda u: math.log((1 - u) / u)  # noqa: E731
    for k in range(6):
        x, v = traj.xs[k], traj.v[k]
        x0 = x - s[k] * v
        if s[k + 1] == 0:
            assert torch.allclose(traj.xs[k + 1], x0, rtol=0, atol=1e-12)
            continue
        d = x0
        if k > 0 and s[k - 1] < 1:
            r = (lam(s[k]) - lam(s[k - 1])) / (lam(s[k + 1]) - lam(s[k]))
            x0_prev = traj.xs[k - 1] - s[k - 1] * traj.v[k - 1]
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        expected = (s[k + 1] / s[k]) * x + (1 - s[k + 1] / s[k]) * d
        assert torch.allclose(traj.xs[k + 1], expected, rtol=0, atol=1e-12), k


def test_eta_zero_is_deterministic_and_eta_one_is_seeded():
    model = GaussianFlow(0.5, 0.3)
    noise = torch.randn(16, 4)
    a = rollout(model, empty_cond(16), noise, eta=0.0).sample
    b = rollout(model, empty_cond(16), noise, eta=0.0).sample
    assert torch.equal(a, b)
    c = rollout(model, empty_cond(16), noise, eta=1.0, generator=torch.Generator().manual_seed(3)).sample
    d = rollout(model, empty_cond(16), noise, eta=1.0, generator=torch.Generator().manual_seed(3)).sample
    assert torch.equal(c, d) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="eta"):
        rollout(model, empty_cond(16), noise, eta=1.5)


def test_cfg_one_equals_plain_velocity_and_cfg_extrapolates():
    class Affine:
        def velocity(self, x, s, cond):
            return x * (1 + cond.fields["tokens"].view(-1, 1))

    cond = Cond({"tokens": torch.ones(3, 1)}, {"tokens": torch.zeros(1, 1)})
    noise = torch.randn(3, 2)
    plain = rollout(Affine(), cond, noise, steps=1, cfg=1.0)
    guided = rollout(Affine(), cond, noise, steps=1, cfg=3.0)
    assert torch.allclose(plain.v[0], 2 * noise)
    assert torch.allclose(guided.v[0], noise + 3 * (2 * noise - noise))
