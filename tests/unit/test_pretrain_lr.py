"""The teacher's learning-rate schedule: linear warmup, then constant or a half cosine down to `pretrain.final_lr`,
against values computed by hand."""

import pytest

from tdm_r1.commands.pretrain import pretrain_lr
from tdm_r1.config import load_config


def schedule(*sets):
    return load_config(None, ["pretrain.lr=5e-4", "pretrain.warmup_steps=100", "pretrain.steps=2500", *sets]).pretrain


@pytest.mark.parametrize(("step", "lr"), [(1, 5e-6), (50, 2.5e-4), (100, 5e-4), (101, 5e-4), (2500, 5e-4)])
def test_without_final_lr_the_rate_stays_after_warmup(step, lr):
    assert pretrain_lr(schedule(), step) == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "lr"),
    [
        (50, 2.5e-4),  # warmup unchanged
        (100, 5e-4),  # the top: cos(0) = 1
        (1300, 2.75e-4),  # half way: cos(pi / 2) = 0, the mean of 5e-4 and 5e-5
        (700, 5e-5 + 4.5e-4 * 0.5 * (1 + 2**-0.5)),  # a quarter: cos(pi / 4)
        (2500, 5e-5),  # the last step at exactly final_lr
    ],
)
def test_final_lr_falls_on_a_half_cosine(step, lr):
    assert pretrain_lr(schedule("pretrain.final_lr=5e-5"), step) == pytest.approx(lr, rel=1e-12)


def test_the_cosine_never_rises():
    pc = schedule("pretrain.final_lr=0")
    rates = [pretrain_lr(pc, s) for s in range(100, 2501)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == 0.0
