"""Range checks run before a command touches any file: every shipped recipe passes them for its command, and a value
out of range names its key and the allowed range."""

from pathlib import Path

import pytest

from tdm_r1.config import ConfigError, load_config
from tdm_r1.config.validate import validate


def command_of(name: str) -> str:
    return "pretrain" if "teacher" in name else "distill" if "distill" in name else "train"


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_for_its_command(path):
    validate(load_config(path), command_of(path.name))


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        (
            "pretrain",
            "pretrain.cond_drop_prob=1.5",
            r"pretrain.cond_drop_prob = 1.5 is out of range: it must be in \[0",
        ),
        ("pretrain", "pretrain.ema_decay=1.0", r"pretrain.ema_decay = 1.0 .* in \[0.0, 1.0\)"),
        ("pretrain", "pretrain.final_lr=-1e-4", r"pretrain.final_lr = -0.0001 .* it must be null or >= 0"),
        ("distill", "distill.steps=0", r"distill.steps = 0 is out of range: it must be >= 1"),
        ("distill", "tdm.w_tdm=2", r"tdm.w_tdm = 2.0 .* in \[0.0, 1.0\]"),
        ("train", "train.eta=-1", r"train.eta = -1.0 .* in \[0.0, 1.0\]"),
        ("train", "train.t_min_generator=1", r"train.t_min_generator = 1.0 .* in \[0.0, 1.0\)"),
        ("train", "train.rewards=[]", "train.rewards is empty"),
        ("train", "eval.seeds=0", r"eval.seeds = 0 is out of range: it must be >= 1"),
    ],
)
def test_a_value_out_of_range_names_its_key_and_range(command, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override]), command)
    validate(load_config(None, []), command)  # the defaults pass
