"""The native kernels split rows into fixed chunks and add chunk partials in a fixed order, so their results
do not depend on the number of threads: checked bitwise with 1 and 2 threads on rows of several chunks."""

import pytest
import torch
from utils import leaf, make

from tdm_r1_kernels import fused_revised_x0_loss, fused_sampler_step, fused_velocity_target_mse


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run_all():
    torch.manual_seed(0)
    dims = (3, 70001)  # five 16384-element chunks per row, the last one ragged
    x, v, n, prev = (make(dims, torch.float32) for _ in range(4))
    s, s_next = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([0.75, 0.5, 0.0])
    vs = leaf(v)
    step = fused_sampler_step(x, vs, s, s_next, x0_prev=prev, s_prev=torch.tensor([1.0, 0.9, 0.75]), noise=n,
                              tau=torch.tensor([0.8, 0.9, 0.5]), backend="native")  # fmt: skip
    (g_v,) = torch.autograd.grad(step[:3], vs, [make(dims, torch.float32) for _ in range(3)])
    vl = leaf(v)
    l = fused_velocity_target_mse(x, n, s_next, torch.tensor([0.9, 0.8, 0.7]), vl, backend="native")
    (g_l,) = torch.autograd.grad(l.sum(), vl)
    xl = leaf(x)
    weights = torch.tensor([[1.0, 0.3, 0.7], [0.3, 0.3, 0.0], [1.0, 0.3, 0.7]])
    loss, terms = fused_revised_x0_loss(xl, v, n, prev, v + 0.1, n + 0.1, weights, backend="native")
    (g_x,) = torch.autograd.grad(loss.sum(), xl)
    return [step.x_next, step.x0_hat, step.x_tau, g_v, l, g_l, loss, terms, g_x]


def test_results_do_not_depend_on_thread_count(native_lib, threads):
    threads(1)
    one = _run_all()
    threads(2)
    two = _run_all()
    for a, b in zip(one, two):
        assert torch.equal(a.detach(), b.detach())
