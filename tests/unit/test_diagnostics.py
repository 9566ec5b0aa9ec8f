"""Learned-reward diagnostics: the best-of-k ceiling and the surrogate preference probe."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tdm_r1.config import WorldConfig
from tdm_r1.diagnostics import (
    best_of_k,
    error_positions,
    format_probe,
    ink_layout,
    preference_probe,
    solid_blocks,
    split_scores,
    start_noise_share,
)
from tdm_r1.worlds.ocr import build_world
from tdm_r1_kernels.reference import velocity_target_mse_ref


def test_best_of_k_hand_computed():
    r = torch.tensor([[0.2, 0.9, 0.5, 1.0], [0.7, 0.1, 0.3, 0.4]])
    assert best_of_k(r) == pytest.approx({1: 0.45, 2: 0.8, 4: 0.85})


def test_best_of_k_group_not_a_power_of_two_and_nan_scores():
    r = torch.tensor([[math.nan, 0.5, 0.1], [0.3, math.nan, 0.9]])
    # k = 1: the first prompt has no score yet and is left out; a NaN never wins
    assert best_of_k(r) == pytest.approx({1: 0.3, 2: 0.4, 3: 0.7})
    with pytest.raises(ValueError, match=r"rewards \[P, G\]"):
        best_of_k(torch.ones(4))


def _probe_batch(n_groups=4, group=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n_groups * group, 1, 4, 8), generator=g)  # the final state x_K at s = 0
    xs = torch.stack([torch.randn_like(x0), x0])
    adv = torch.randn(n_groups * group, generator=g)
    group_ids = torch.arange(n_groups).repeat_interleave(group)
    traj = SimpleNamespace(xs=xs, s=torch.tensor([1.0, 0.0]))
    return SimpleNamespace(traj=traj, adv=adv, group_ids=group_ids, cond=None), x0, n_groups


def test_probe_of_a_surrogate_that_denoises_exactly_the_good_samples():
    """Surrogate = the exact velocity target on samples with A > 0 and 0 elsewhere, reference = 0: l - l_ref is
    -l_ref on the good samples and 0 on the others; the probe must report that difference's mean and its
    correlation with A (computed here with the fp32 reference op and numpy)."""
    batch, x0, n_groups = _probe_batch()
    good = batch.adv > 0

    def surrogate(x_tau, tau, cond):  # at s = 0: v* = n - x0 = (x_tau - x0) / tau
        v_star = (x_tau - x0) / tau.view(-1, 1, 1, 1)
        return torch.where(good.view(-1, 1, 1, 1), v_star, torch.zeros_like(v_star))

    roles = SimpleNamespace(
        surrogate=SimpleNamespace(velocity=surrogate),
        reference=SimpleNamespace(velocity=lambda x_tau, tau, cond: torch.zeros_like(x_tau)),
    )
    rows = preference_probe(roles, batch, (0.3, 0.8), torch.Generator().manual_seed(5), states=(1,))
    g = torch.Generator().manual_seed(5)
    expected = []
    for tau in (0.3, 0.8):
        noise = torch.randn((n_groups, *x0.shape[1:]), generator=g)[batch.group_ids]
        l_ref = velocity_target_mse_ref(x0, noise, 0.0, tau, torch.zeros_like(x0))
        d = torch.where(good, -l_ref, torch.zeros_like(l_ref)).numpy()
        expected.append((float(np.corrcoef(batch.adv.numpy(), d)[0, 1]), float(d.mean())))
    assert [(r["state"], r["tau"]) for r in rows] == [(1, 0.3), (1, 0.8)]
    for row, (corr, mean) in zip(rows, expected):
        assert row["corr"] == pytest.approx(corr, abs=1e-5) and corr < -0.3
        assert row["mean_diff"] == pytest.approx(mean, rel=1e-5)
    assert format_probe(rows).splitlines()[1].split()[:3] == ["x_1", "0.000", "0.30"]


def test_probe_of_a_surrogate_equal_to_the_reference():
    batch, _, _ = _probe_batch()
    same = SimpleNamespace(velocity=lambda x_tau, tau, cond: 0.5 * x_tau)
    rows = preference_probe(SimpleNamespace(surrogate=same, reference=same), batch, (0.05, 0.5), torch.Generator())
    # the state at s = 1 has no tau above it; at s = 0 both taus, with no difference and so no correlation
    assert [(r["state"], r["tau"]) for r in rows] == [(1, 0.05), (1, 0.5)]
    assert all(r["mean_diff"] == 0.0 and math.isnan(r["corr"]) for r in rows)


def test_error_positions_hand_computed():
    words = ["ABC", "ABC", "ABCD", "AB"]
    readings = ["ABC", "ABX", "AXCD", ""]  # exact; 3rd letter wrong; 2nd wrong; nothing read
    by_pos, by_len = error_positions(words, readings)
    # position 0: wrong only in "" (1 of 4); 1: "AXCD" and "" (2 of 4); 2: "ABX" (1 of 3); 3: none of 1
    assert by_pos == {0: 0.25, 1: 0.5, 2: pytest.approx(1 / 3), 3: 0.0}
    assert by_len == {2: 0.0, 3: 0.5, 4: 0.0}
    by_pos, _ = error_positions(["ABCDE"], ["ABDE"])  # a dropped letter is the only error
    assert by_pos == {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    with pytest.raises(ValueError, match="2 words but 1 readings"):
        error_positions(["A", "B"], ["A"])


def test_ink_layout_hand_computed():
    img = torch.full((3, 2, 6), 0.9)
    img[0, 1, 1:3] = 0.1  # ink in columns 1-2
    img[1, 0, 2] = 0.3  # columns 2 and 5: reaches the edge (last 2 columns)
    img[1, 1, 5] = 0.2
    img[2, 0, 4] = 0.5  # not below the threshold: no ink at all
    out = ink_layout(img, threshold=0.475)
    assert out["left"].tolist() == [1, 2, 6] and out["right"].tolist() == [2, 5, -1]
    assert out["at_edge"].tolist() == [False, True, False]
    assert ink_layout(img, threshold=0.6)["at_edge"].tolist() == [False, True, True]  # column 4 counts now
    assert ink_layout(img, threshold=0.475, edge=1)["at_edge"].tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"images \[N, H, W\]"):
        ink_layout(torch.ones(2, 1, 2, 6), 0.5)


def test_solid_blocks_hand_computed():
    img = torch.full((4, 4, 10), 0.9)
    img[0, 1:3, 2:7] = 0.1  # a 5-column block over both ink rows
    img[0, 1, 8] = 0.1  # a letter's pixel elsewhere on row 1
    img[1, 0:4, 1] = 0.1  # stems one column wide, apart: no run longer than 1
    img[1, 0:4, 3] = 0.1
    img[1, 0:4, 5] = 0.1
    img[2, 0:3, 2:6] = 0.1  # columns 2-5 cover 3 of 4 ink rows (row 3 has ink at column 9 only)
    img[2, 3, 9] = 0.1
    out = solid_blocks(img, threshold=0.475)  # image 3: no ink at all
    assert out["width"].tolist() == [5, 1, 0, 0] and out["blotted"].tolist() == [True, False, False, False]
    # at fill 0.75, 3 of 4 rows are enough: image 2's columns 2-5 form a block of 4
    assert solid_blocks(img, threshold=0.475, fill=0.75)["width"].tolist() == [5, 1, 4, 0]
    assert solid_blocks(img, threshold=0.475, min_width=6)["blotted"].tolist() == [False] * 4
    with pytest.raises(ValueError, match=r"images \[N, H, W\]"):
        solid_blocks(torch.ones(2, 1, 2, 6), 0.5)


def test_solid_blocks_tell_the_blot_worlds_renders_apart():
    # on the world's own renders: a clean word's widest solid run is a stem (<= 1 column), every blot is >= 4
    words = build_world(WorldConfig()).items("heldout")
    clean = build_world(WorldConfig()).render_batch(words, np.random.default_rng(0))[:, 0]
    blot = build_world(WorldConfig(blot_prob=1.0)).render_batch(words, np.random.default_rng(0))[:, 0]
    assert not solid_blocks(clean, 0.475)["blotted"].any()
    assert solid_blocks(blot, 0.475)["blotted"].all()


def test_split_scores_hand_computed():
    scores = torch.tensor([0.2, 1.0, 0.6, 0.8])
    out = split_scores(scores, torch.tensor([True, False, True, False]), "blotted", "clean")
    assert out == pytest.approx({"blotted": 0.5, "ocr_mean_blotted": 0.4, "ocr_mean_clean": 0.9})
    none = split_scores(scores, torch.zeros(4, dtype=torch.bool), "at_edge", "inside")
    assert none["at_edge"] == 0 and none["ocr_mean_at_edge"] is None and none["ocr_mean_inside"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="bool mask"):
        split_scores(scores, torch.ones(4), "a", "b")


def test_start_noise_share_hand_computed():
    det = torch.tensor([1.0, 0.0, 1.0])
    stoch = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    out = start_noise_share(det, stoch)
    # all six rewards: mean 1/2, variance 1/4; within starts 0, 1/4, 0 -> 1/12; 1 - (1/12) / (1/4) = 2/3
    assert out["start_share"] == pytest.approx(2 / 3)
    assert out["same_as_deterministic"] == pytest.approx(3 / 6)  # 2 of row 0, 1 of row 1, none of row 2
    # det - 2/3 = (1/3, -2/3, 1/3), stochastic means - 1/2 = (1/2, 0, -1/2): orthogonal
    assert out["corr"] == pytest.approx(0.0, abs=1e-12)
    assert out["mean_deterministic"] == pytest.approx(2 / 3) and out["mean_stochastic"] == pytest.approx(0.5)
    assert (out["n"], out["draws"]) == (3, 2)


def test_start_noise_share_limits():
    det = torch.tensor([0.2, 0.9, 0.5, 0.1])
    # the re-noising never changes a reward: the start decides everything
    same = start_noise_share(det, det[:, None].repeat(1, 5))
    assert same["start_share"] == pytest.approx(1.0) and same["same_as_deterministic"] == 1.0
    assert same["corr"] == pytest.approx(1.0)
    # every start sees the same spread of rewards: the start decides nothing
    flat = start_noise_share(det, torch.tensor([[0.0, 1.0]]).repeat(4, 1))
    assert flat["start_share"] == pytest.approx(0.0, abs=1e-12) and math.isnan(flat["corr"])
    with pytest.raises(ValueError, match=r"det \[N\] and stoch \[N, R\]"):
        start_noise_share(det, torch.ones(3, 2))
