"""Reward protocol and registry.

`Reward.__call__(images [B, 3, H, W] float in [0, 1] on CPU, prompts, metadata) -> scores [B] float`,
always called under `torch.no_grad()` on detached images: non-differentiable by contract. A sample the
scorer cannot judge is NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from tdm_r1.config import ConfigError


class RewardFailureError(RuntimeError):
    """Too many samples of an epoch could not be scored; the run stops after a checkpoint."""


class RewardSetupError(ConfigError):
    """A model-based reward cannot be built: its local weights or a package it needs are missing (the message names
    which, and how to get them). Rewards never download anything."""


def require_path(path: str, reward: str, what: str, hint: str) -> Path:
    """The local path a reward's weights come from (train.rewards[].path), or a RewardSetupError naming it."""
    if not path:
        raise RewardSetupError(f"reward {reward!r} needs {what}: set its `path` in train.rewards. {hint}")
    p = Path(path).expanduser()
    if not p.exists():
        raise RewardSetupError(f"reward {reward!r}: path {path!r} does not exist (expected {what}). {hint}")
    return p


def require_package(module: str, reward: str, install: str):
    """Import `module` for a reward, or raise a RewardSetupError naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RewardSetupError(f"reward {reward!r} needs the `{module}` package ({install}): {e}") from e


def reward_device(device: str) -> torch.device:
    """train.rewards[].device: auto = this process's CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


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
        import tdm_r1.rewards.geneval  # noqa: F401  (registers the built-ins; model packages load on use)
        import tdm_r1.rewards.ocr  # noqa: F401
        import tdm_r1.rewards.pickscore  # noqa: F401
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
