"""fused_sampler_step (Euler, DPM-Solver++(2M), fused re-noising) against the fp32 reference."""

import pytest
import torch
from utils import assert_close, fp32_leaf, leaf, make

from tdm_r1_kernels import fused_renoise, fused_sampler_step
from tdm_r1_kernels.reference import renoise_coefficients, sampler_step_ref

VARIANTS = ["euler", "dpm2m", "euler+renoise", "dpm2m+renoise"]


def schedule(B: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample s > s_next, s_prev > s, tau >= s_next; with B >= 3 the first step (s = 1) and last (s_next = 0)."""
    # steps of at least 20% of s and s_prev <= 0.99 keep |c2| >= ~0.01, so fp16 gradients stay normal numbers
    s = 0.3 + 0.7 * torch.rand(B)
    s_next = s * (0.3 + 0.5 * torch.rand(B))
    s_prev = torch.clamp(s + (1 - s) * (0.2 + 0.8 * torch.rand(B)), max=0.99)
    if B >= 3:
        s[0], s_prev[0] = 1.0, 1.0
        s_next[-1] = 0.0
    tau = s_next + (1 - s_next) * torch.rand(B)
    return {k: t.to(device) for k, t in dict(s=s, s_next=s_next, s_prev=s_prev, tau=tau).items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_step(backend, dtype, shape, variant):
    name, device = backend
    dims, contiguous = shape
    interp = name == "triton" and device.type == "cpu"
    sch = schedule(dims[0], device)
    dpm, ren = "dpm2m" in variant, "renoise" in variant
    x, v = make(dims, dtype, device, contiguous), make(dims, dtype, device, contiguous)
    prev = make(dims, dtype, device, contiguous) if dpm else None
    noise = make(dims, dtype, device, contiguous) if ren else None
    s_prev, tau = (sch["s_prev"] if dpm else None), (sch["tau"] if ren else None)

    ins = [leaf(t) for t in (x, v, prev, noise)]
    out = fused_sampler_step(
        ins[0], ins[1], sch["s"], sch["s_next"], x0_prev=ins[2], s_prev=s_prev, noise=ins[3], tau=tau, backend=name
    )
    refs_in = [fp32_leaf(t) for t in (x, v, prev, noise)]
    ref = sampler_step_ref(refs_in[0], refs_in[1], sch["s"], sch["s_next"], refs_in[2], s_prev, refs_in[3], tau)

    outs = [out.x_next, out.x0_hat] + ([out.x_tau] if ren else [])
    refs = [ref[0], ref[1]] + ([ref[2]] if ren else [])
    for nm, o, r in zip(["x_next", "x0_hat", "x_tau"], outs, refs):
        assert o.dtype == dtype and o.shape == dims
        assert_close(nm, o, r, "store", dtype, interp)
    if ren:
        a, b = renoise_coefficients(sch["s_next"], tau, dims[0], device)
        assert torch.equal(out.a, a) and torch.equal(out.b, b)
    else:
        assert out.x_tau is None and out.a is None

    grads_out = [make(dims, dtype, device) for _ in outs]
    wrt = [t for t in ins if t is not None]
    wrt_ref = [t for t in refs_in if t is not None]
    got = torch.autograd.grad(outs, wrt, grads_out)
    want = torch.autograd.grad(refs, wrt_ref, [g.float() for g in grads_out])
    for nm, g, w in zip(["grad_x", "grad_v", "grad_x0_prev" if dpm else "grad_noise", "grad_noise"], got, want):
        assert g.dtype == dtype
        assert_close(nm, g, w, "store", dtype, interp)


def test_sampler_step_partial_gradients(backend):
    """Only v needs a gradient and only x0_hat is used: the other gradient slots are skipped, not filled."""
    name, device = backend
    x, v = make((3, 50), torch.float32, device), leaf(make((3, 50), torch.float32, device))
    out = fused_sampler_step(x, v, 0.75, 0.5, backend=name)
    g = make((3, 50), torch.float32, device)
    (gv,) = torch.autograd.grad(out.x0_hat, v, g)
    assert_close("grad_v", gv, -0.75 * g, "store", torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rollout_and_training_agree_bitwise(backend, variant):
    """The rollout (no grad) and the training step (grad) go through the same kernel: identical bits."""
    name, device = backend
    dims = (4, 3, 11, 13)
    sch = schedule(4, device)
    x, v, prev, noise = (make(dims, torch.bfloat16, device) for _ in range(4))
    kw = {}
    if "dpm2m" in variant:
        kw.update(x0_prev=prev, s_prev=sch["s_prev"])
    if "renoise" in variant:
        kw.update(noise=noise, tau=sch["tau"])
    with torch.no_grad():
        rollout = fused_sampler_step(x, v, sch["s"], sch["s_next"], backend=name, **kw)
    train = fused_sampler_step(x, leaf(v), sch["s"], sch["s_next"], backend=name, **kw)
    assert train.x0_hat.requires_grad
    for r, t in zip(rollout, train):
        assert (r is None and t is None) or torch.equal(r, t.detach())


def test_euler_matches_dpm_first_order(backend):
    """Without a usable previous step (s_prev = 1), DPM-Solver++(2M) is the Euler/DDIM step."""
    name, device = backend
    x, v, prev = (make((2, 40), torch.float32, device) for _ in range(3))
    euler = fused_sampler_step(x, v, 0.9, 0.75, backend=name)
    dpm = fused_sampler_step(x, v, 0.9, 0.75, x0_prev=prev, s_prev=1.0, backend=name)
    assert torch.equal(euler.x_next, dpm.x_next) and torch.equal(euler.x0_hat, dpm.x0_hat)


def test_dpm2m_matches_closed_form():
    """The c2 rewrite equals the textbook 2M update x_next = (s'/s) x + (1 - s'/s) D, in fp64."""
    s, s_next, s_prev = 0.75, 0.5, 0.9
    x, v, prev = (torch.randn(2, 30, dtype=torch.float64) for _ in range(3))
    lam = lambda u: torch.log(torch.tensor((1 - u) / u, dtype=torch.float64))
    h, h_prev = lam(s_next) - lam(s), lam(s) - lam(s_prev)
    r = h_prev / h
    x0 = x - s * v
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
    expected = (s_next / s) * x + (1 - s_next / s) * D
    got, _, _ = sampler_step_ref(x, v, s, s_next, prev, s_prev)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renoise", [False, True], ids=["euler", "euler+renoise"])
def test_out_buffers(backend, renoise):
    """out= writes the same bits into the caller's (NaN-filled) buffers and returns them."""
    name, device = backend
    dims = (3, 5, 41)
    x, v, noise = (make(dims, torch.float32, device) for _ in range(3))
    kw = dict(noise=noise, tau=torch.tensor([0.8, 0.9, 0.95], device=device)) if renoise else {}
    s, s_next = torch.tensor([0.9, 0.75, 0.5], device=device), torch.tensor([0.75, 0.5, 0.0], device=device)
    bufs = tuple(torch.full(dims, float("nan"), device=device) for _ in range(3 if renoise else 2))
    with torch.no_grad():
        expected = fused_sampler_step(x, v, s, s_next, backend=name, **kw)
        got = fused_sampler_step(x, v, s, s_next, out=bufs, backend=name, **kw)
    for g, b, e in zip(got, bufs, expected):
        assert g is b and torch.equal(g, e)


def test_out_mixed_dtypes(backend):
    """fp32 state with a bf16 velocity (a model's output) into fp32 buffers matches the reference."""
    name, device = backend
    x, v = make((2, 300), torch.float32, device), make((2, 300), torch.bfloat16, device)
    bufs = (torch.empty(2, 300, device=device), torch.empty(2, 300, device=device))
    with torch.no_grad():
        got = fused_sampler_step(x, v, 0.5, 0.25, out=bufs, backend=name)
    ref = sampler_step_ref(x, v.float(), 0.5, 0.25)
    assert_close("x_next", got.x_next, ref[0], "store", torch.float32)
    assert_close("x0_hat", got.x0_hat, ref[1], "store", torch.float32)


def test_out_refuses_autograd(backend):
    name, device = backend
    x, v = make((2, 30), torch.float32, device), leaf(make((2, 30), torch.float32, device))
    bufs = (torch.empty(2, 30, device=device), torch.empty(2, 30, device=device))
    with pytest.raises(ValueError, match="no_grad"):
        fused_sampler_step(x, v, 0.5, 0.25, out=bufs, backend=name)
    with pytest.raises(ValueError, match="contiguous"), torch.no_grad():
        fused_sampler_step(x, v, 0.5, 0.25, out=(bufs[0], torch.empty(30, 2, device=device).t()), backend=name)


@pytest.mark.parametrize("variant", [*VARIANTS, "renoise-op"])
def test_native_forward_rounds_like_the_reference(native_lib, dtype, variant):
    """The native library is built without fused multiply-adds (-ffp-contract=off), so its forward rounds every
    operation as the eager reference does: the same bits in every template variant (a rollout step and the same
    step inside a training loss with the tau re-noising fused), on either backend."""
    dims = (3, 5, 17, 19)
    sch = schedule(3, torch.device("cpu"))
    x, v, prev, noise = (make(dims, dtype) for _ in range(4))
    if variant == "renoise-op":
        got, want = (fused_renoise(x, noise, sch["s_next"], sch["tau"], backend=be) for be in ("native", "reference"))
        assert torch.equal(got[0], want[0])
        return
    kw = {}
    if "dpm2m" in variant:
        kw |= dict(x0_prev=prev, s_prev=sch["s_prev"])
    if "renoise" in variant:
        kw |= dict(noise=noise, tau=sch["tau"])
    got, want = (fused_sampler_step(x, v, sch["s"], sch["s_next"], backend=be, **kw) for be in ("native", "reference"))
    for name, g, w in zip(("x_next", "x0_hat", "x_tau"), got[:3], want[:3]):
        assert (g is None) == (w is None)
        assert g is None or torch.equal(g, w), f"{name}: {int((g != w).sum())} elements differ"
