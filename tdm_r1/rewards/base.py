"""Reward protocol and registry.

`Reward.__call__(images [B, 3, H, W] float in [0, 1] on CPU, prompts, metadata) -> scores [B] float`,
always called under `torch.no_grad()` on detached images: non-differentiable by contract. A sample the
scorer cannot judge is NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class RewardFailureError(RuntimeError):
    """Too many samples of an epoch could not be scored; the run stops after a checkpoint."""


class Reward(Protocol):
    name: str

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable:
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _REGISTRY[name] = factory
        return factory

    return deco


def build_reward(name: str, **kwargs: Any) -> Reward:
    if name not in _REGISTRY:
        import tdm_r1.rewards.ocr  # noqa: F401  (registers the built-ins)
        import tdm_r1.rewards.simple  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def score_images(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
    """Call a reward the way the contract says: detached CPU float images, no grad."""
    with torch.no_grad():
        imgs = images.detach().float().cpu().clamp(0, 1)
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        return reward(imgs, prompts, metadata).float()
