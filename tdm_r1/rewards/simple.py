"""Cheap built-in rewards: plain Python functions of pixels, non-differentiable by construction.

`dark_fraction`: fraction of pixels darker than 0.5 (luma), a stand-in for counting ink. Useful as a
fast reward for tests and as the template for wrapping any Python function as a reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards.base import reward_options


class DarkFraction:
    name = "dark_fraction"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        return (luma < self.threshold).float().flatten(1).mean(1)


@dataclass
class DarkFractionOptions:
    threshold: float = 0.5  # luma below which a pixel counts as ink


def build_dark_fraction(term: RewardTermConfig) -> DarkFraction:
    return DarkFraction(reward_options(term, DarkFractionOptions).threshold)
