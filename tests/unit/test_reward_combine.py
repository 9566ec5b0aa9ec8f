"""Several rewards at once: the scorer's per-reward columns, the two ways they make one advantage
(train.reward_combine), and the per-reward statistics an epoch logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from utils import TINY, save_tiny_teacher, train_epochs

from tdm_r1.advantages import group_advantages, per_reward_advantages
from tdm_r1.rewards.scorer import RewardScorer


class Const:
    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values, dtype=torch.float32)

    def __call__(self, images, prompts, targets):
        return self.values[: images.shape[0]]


class Broken:
    name = "broken"

    def __call__(self, images, prompts, targets):
        raise RuntimeError("judge unavailable")


def _score(scorer, n=4):
    return scorer.parts(torch.rand(n, 3, 4, 4), ["p"] * n, [{}] * n)


def test_scorer_gives_one_column_per_reward_and_their_weighted_sum():
    a, b = Const("a", [1.0, 0.0, 0.5, 0.25]), Const("a", [10.0, 20.0, 30.0, 40.0])
    scorer = RewardScorer([(a, 2.0), (b, 0.1), (Broken(), 1.0)])
    try:
        parts = _score(scorer)
        assert scorer.names == ["a", "a_2", "broken"]
        assert torch.equal(parts[:, 0], a.values) and torch.equal(parts[:, 1], b.values)
        assert torch.isnan(parts[:, 2]).all()  # the failing reward fails its own column only
        assert torch.isnan(scorer(torch.rand(4, 3, 4, 4), ["p"] * 4, [{}] * 4)).all()
        ok = RewardScorer([(a, 2.0), (b, 0.1)])
        total = ok(torch.rand(4, 3, 4, 4), ["p"] * 4, [{}] * 4)
        assert torch.allclose(total, 2.0 * a.values + 0.1 * b.values)
        assert torch.equal(ok.submit(torch.rand(4, 3, 4, 4), ["p"] * 4, [{}] * 4).result(), _score(ok))
        ok.close()
    finally:
        scorer.close()


def _numpy_group_adv(r, groups, eps, clip):
    """DESIGN 5.3 written out independently: (r - group mean) / (epoch std + eps), clipped."""
    r, groups = np.asarray(r, dtype=np.float64), np.asarray(groups)
    means = np.array([r[groups == g].mean() for g in groups])
    return np.clip((r - means) / (r.std() + eps), -clip, clip)


def test_per_reward_advantages_by_hand():
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    small = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # a 0/1 reward
    large = [0.0, 0.0, 0.0, 900.0, 100.0, 0.0, 0.0, 0.0]  # another reward on a 1000x scale
    parts = torch.tensor([small, large]).T
    got = per_reward_advantages(parts, [1.0, 1.0], groups, 1e-4, 5.0)
    want = _numpy_group_adv(small, groups, 1e-4, 5.0) + _numpy_group_adv(large, groups, 1e-4, 5.0)
    assert np.allclose(got.numpy(), want, atol=1e-6)
    # the weighted sum first: the large reward decides every sign, the small one is drowned
    summed = group_advantages(parts.sum(1), groups, 1e-4, 5.0).numpy()
    adv_small, adv_large = (_numpy_group_adv(x, groups, 1e-4, 5.0) for x in (small, large))
    assert np.corrcoef(summed, adv_large)[0, 1] > 0.999 and abs(np.corrcoef(summed, adv_small)[0, 1]) < 0.3
    per = got.numpy()
    assert np.corrcoef(per, adv_small)[0, 1] > 0.5 and np.corrcoef(per, adv_large)[0, 1] > 0.5


def test_a_sample_any_reward_failed_on_is_excluded_from_all():
    groups = torch.tensor([0, 0, 0, 0])
    parts = torch.tensor([[1.0, 0.0], [0.0, math.nan], [0.5, 2.0], [0.25, 4.0]])
    got = per_reward_advantages(parts, [1.0, 0.5], groups, 1e-4, 5.0)
    keep = [0, 2, 3]
    want = _numpy_group_adv(parts[keep, 0], [0, 0, 0], 1e-4, 5.0) + 0.5 * _numpy_group_adv(
        parts[keep, 1], [0, 0, 0], 1e-4, 5.0
    )
    assert got[1] == 0.0 and np.allclose(got[keep].numpy(), want, atol=1e-6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("combine") / "teacher.safetensors"
    save_tiny_teacher(path)
    return path


RUN = ["train.prompts_per_epoch=2", "train.group_size=3", "train.micro_batch_groups=1"]
TWO = (
    "train.rewards=[{name: dark_fraction, weight: 1.0}, "
    "{name: dark_fraction, weight: 100.0, options: {threshold: 0.3}}]"
)


@pytest.mark.parametrize("combine", ["sum", "per_reward"])
def test_an_epoch_logs_every_reward_and_combines_as_configured(combine, teacher, tmp_path, monkeypatch):
    import tdm_r1.phases as phases

    seen = {}

    def spy(*args, **kwargs):
        seen["called"] = True
        return per_reward_advantages(*args, **kwargs)

    monkeypatch.setattr(phases, "per_reward_advantages", spy)
    sets = [*TINY, *RUN, TWO, f"train.reward_combine={combine}", f"roles.teacher={teacher}", f"run_dir={tmp_path}"]
    (rec,) = train_epochs(sets, epochs=1)
    for name in ("dark_fraction", "dark_fraction_2"):
        assert 0.0 <= rec[f"reward_{name}_mean"] <= 1.0 and rec[f"reward_{name}_std"] >= 0
        assert rec[f"reward_{name}_failed"] == 0
    total = rec["reward_dark_fraction_mean"] + 100.0 * rec["reward_dark_fraction_2_mean"]
    assert rec["reward_mean"] == pytest.approx(total, rel=1e-5)  # the logged reward is the weighted sum
    assert seen.get("called", False) == (combine == "per_reward")
