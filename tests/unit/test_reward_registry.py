"""The lazy reward registry: built-in names map to import paths, a user's reward is named by its import path, and
unknown names or paths are errors that say what was tried."""

import importlib
import sys

import pytest
import torch

from tdm_r1.rewards.base import BUILTIN_REWARDS, build_reward, register_reward, reward_factory


def test_every_builtin_name_resolves_to_the_factory_its_path_names():
    for name, path in BUILTIN_REWARDS.items():
        module, _, attr = path.partition(":")
        assert reward_factory(name) is getattr(importlib.import_module(module), attr), name


def test_a_reward_outside_the_package_is_built_by_its_import_path():
    reward = build_reward("example_reward:build_half")
    assert torch.equal(reward(torch.rand(3, 3, 4, 4), ["a", "b", "c"], [{}] * 3), torch.full((3,), 0.5))
    assert "example_reward" in sys.modules


def test_registered_names_come_first():
    @register_reward("dark_fraction_twice")
    def _twice(term):
        return lambda images, prompts, targets: 2 * build_reward("dark_fraction")(images, prompts, targets)

    images = torch.zeros(2, 3, 4, 4)  # all dark
    assert torch.equal(build_reward("dark_fraction_twice")(images, ["a", "b"], [{}] * 2), torch.full((2,), 2.0))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", r"unknown reward 'nope'; registered: .*dark_fraction.*ocr.*or an import path"),
        ("no_such_module:build", r"reward 'no_such_module:build': cannot import 'no_such_module'"),
        ("example_reward:missing", r"reward 'example_reward:missing': 'example_reward' has no callable 'missing'"),
    ],
)
def test_unknown_names_and_paths_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        reward_factory(name)
