"""fused_group_preference (scores, weights, PPO and reference gates) against the fp32 reference."""

import pytest
import torch
from utils import assert_close

from tdm_r1_kernels import fused_group_preference, fused_group_preference_scores, fused_group_preference_weights
from tdm_r1_kernels.reference import group_preference_ref

# (samples, groups): one sample; groups that do not divide the batch; more members than one Triton block (64)
SIZES = [(1, 1), (37, 5), (700, 3), (1000, 41)]


def inputs(n: int, groups: int, dtype: torch.dtype, device: torch.device, clip: float = 1e-3) -> dict:
    l = (torch.rand(n) + 0.1).to(dtype)
    l_old = (l.float() * torch.exp(0.003 * torch.randn(n))).to(dtype)
    # exp() may differ by an ulp between backends: keep ratios off the PPO thresholds 1 +- clip (samples
    # within 1e-5 of one get ratio 1) so the masks can be compared exactly
    ratio = torch.exp(l_old.double() - l.double())
    tie = ((ratio - (1 + clip)).abs() < 1e-5) | ((ratio - (1 - clip)).abs() < 1e-5)
    l_old = torch.where(tie, l, l_old)
    return dict(
        l=l.to(device),
        l_ref=(l.float() + 0.05 * torch.randn(n)).to(dtype).to(device),
        l_old=l_old.to(device),
        advantages=torch.randn(n).clamp(-5, 5).to(dtype).to(device),
        group=torch.randint(0, groups, (n,)).to(device),
    )


@pytest.mark.parametrize("ref_div", [None, 0.01, 0.2], ids=["no-ref-gate", "ref-div-low", "ref-div-high"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{n}x{g}" for n, g in SIZES])
def test_group_preference(backend, dtype, size, ref_div):
    name, device = backend
    n, groups = size
    interp = name == "triton" and device.type == "cpu"
    inp = inputs(n, groups, dtype, device)
    args = (inp["l"], inp["l_ref"], inp["l_old"], inp["advantages"], inp["group"], groups, 10.0, 24, 1e-3)
    out = fused_group_preference(*args, ref_div=ref_div, backend=name)
    ref = group_preference_ref(
        *(a.float() if a.is_floating_point() else a for a in args[:5]), *args[5:], ref_div=ref_div
    )
    assert_close("scores", out.scores, ref.scores, "reduce", dtype, interp)
    assert_close("weights", out.weights, ref.weights, "reduce", dtype, interp)
    assert out.ppo_mask.dtype == torch.bool and torch.equal(out.ppo_mask, ref.ppo_mask)
    assert torch.equal(out.ref_mask, ref.ref_mask)
    if ref_div is None or ref_div < 0.05:
        assert not out.ref_mask.any()


def test_two_step_entry_points_compose(backend):
    """Scores summed over two 'ranks' then weights == the single-process op on the union."""
    name, device = backend
    inp = inputs(96, 4, torch.float32, device, clip=2e-3)
    full = fused_group_preference(
        inp["l"],
        inp["l_ref"],
        inp["l_old"],
        inp["advantages"],
        inp["group"],
        4,
        1.0,
        24,
        2e-3,
        ref_div=0.5,
        backend=name,
    )
    halves = [slice(0, 48), slice(48, 96)]
    scores = sum(
        fused_group_preference_scores(
            inp["l"][h], inp["l_ref"][h], inp["advantages"][h], inp["group"][h], 4, 1.0, 24, backend=name
        )
        for h in halves
    )
    assert_close("scores", scores, full.scores, "reduce", torch.float32)
    h = halves[1]
    w, ppo, ref = fused_group_preference_weights(
        scores,
        inp["l"][h],
        inp["l_ref"][h],
        inp["l_old"][h],
        inp["advantages"][h],
        inp["group"][h],
        2e-3,
        0.5,
        backend=name,
    )
    assert_close("weights", w, full.weights[h], "reduce", torch.float32)
    assert torch.equal(ppo, full.ppo_mask[h]) and torch.equal(ref, full.ref_mask[h])


def test_gates_by_hand():
    """PPO: (A > 0 and ratio > 1 + c) or (A <= 0 and ratio < 1 - c); reference gate: moved past l_ref."""
    l = torch.tensor([1.0, 1.0, 1.0, 1.0])
    l_old = torch.tensor([1.01, 0.99, 0.99, 1.01])  # ratio = exp(l_old - l)
    l_ref = torch.tensor([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = group_preference_ref(l, l_ref, l_old, adv, torch.zeros(4, dtype=torch.long), 1, 1.0, 4, 1e-3, ref_div=1.0)
    assert out.ppo_mask.tolist() == [True, False, True, False]
    assert out.ref_mask.tolist() == [True, False, False, True]
    expected = torch.sigmoid(torch.tensor((1 * (1 - 1.5) + 1 * (1 - 0.5) - (1 - 1.5) - (1 - 0.5)) / 4))
    assert torch.allclose(out.weights, expected.expand(4))
