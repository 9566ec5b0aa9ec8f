"""Reward protocol and registry.

`Reward.__call__(images [B, 3, H, W] float in [0, 1] on CPU, prompts, targets) -> scores [B] float`,
always called under `torch.no_grad()` on detached images: non-differentiable by contract. `targets[i]` is what the
world says sample i is judged against (`World.targets`: the word to read, a requested count, GenEval's clauses), so
no reward parses it back out of a prompt; `prompts[i]` is the text the model was conditioned on (for rewards that
compare image and text, e.g. PickScore). A sample the scorer cannot judge is NaN.

A reward is built by a factory `factory(term) -> Reward` from its own `train.rewards` entry (`RewardTermConfig`:
name, weight, path, device, batch_size, and `options`, the reward's own settings, read with `reward_options`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from tdm_r1.config import ConfigError, RewardTermConfig, from_dict
from tdm_r1.registry import resolve


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


def load_transformers_folder(
    path: str, reward: str, what: str, hint: str, model_class: str, install: str, files: tuple[str, ...] = ()
):
    """(processor, model) of a reward's local transformers folder (a model saved with its processor), offline, the
    model frozen in eval mode on the CPU; every missing file (config.json, the processor's config, `files`) named in
    one RewardSetupError."""
    root = require_path(path, reward, what, hint)
    transformers = require_package("transformers", reward, install)
    missing = [f for f in ("config.json", *files) if not (root / f).is_file()]
    if not any((root / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")  # processor_config.json when transformers >= 5 saved it
    if missing:
        raise RewardSetupError(f"reward {reward!r}: {root} lacks {', '.join(missing)}. {hint}")
    try:
        processor = transformers.AutoProcessor.from_pretrained(root, local_files_only=True)
        model = getattr(transformers, model_class).from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RewardSetupError(f"reward {reward!r}: could not load {root}: {e}. {hint}") from e
    return processor, model.eval().requires_grad_(False)


def reward_device(device: str) -> torch.device:
    """train.rewards[].device: auto = this rank's own CUDA device when there is one, else the CPU
    (`tdm_r1.distributed.device_for`)."""
    from tdm_r1.distributed import rank_device

    return rank_device(device)


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor: ...


def reward_options(term: RewardTermConfig, cls: type):
    """The dataclass `cls` of a reward's settings from its entry's `options`, strictly: an unknown key or a wrong
    type is a ConfigError naming `train.rewards[<name>].options.<key>`."""
    try:
        return from_dict(dict(term.options), cls)
    except ConfigError as e:
        raise ConfigError(f"train.rewards[{term.name}].options: {e}") from e


# The built-in rewards by name, as import paths "module:factory": a reward's module (and the packages it needs) is
# imported only when a run uses it. A new reward is its own module plus one line here; a user's reward needs no line
# at all: `name: my_package.my_module:build_my_reward` in train.rewards, or register_reward at run time.
BUILTIN_REWARDS: dict[str, str] = {
    "ocr": "tdm_r1.rewards.ocr:build_ocr_reward",
    "dark_fraction": "tdm_r1.rewards.simple:build_dark_fraction",
    "pickscore": "tdm_r1.rewards.pickscore:build_pickscore",
    "geneval": "tdm_r1.rewards.geneval:build_geneval",
    "remote": "tdm_r1.rewards.remote:build_remote",
    "counting": "tdm_r1.rewards.counting:build_counting",
    "owlv2_count": "tdm_r1.rewards.owlv2_count:build_owlv2_count",
    "human": "tdm_r1.rewards.human:build_human",
}
_REGISTRY: dict[str, Callable[..., Reward]] = {}  # registered at run time (register_reward)


def register_reward(name: str) -> Callable:
    """Decorator: make `factory(term) -> Reward` buildable under `name` in this process."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        _REGISTRY[name] = factory
        return factory

    return deco


def reward_factory(name: str) -> Callable[..., Reward]:
    """The factory of a registered name, a built-in name or an import path "module:factory"; a clear error otherwise."""
    return resolve(name, BUILTIN_REWARDS, _REGISTRY, "reward")


def build_reward(term: RewardTermConfig | str, **options: Any) -> Reward:
    """The reward of a train.rewards entry (or of a name, with `options` as its entry's options)."""
    if isinstance(term, str):
        term = RewardTermConfig(name=term, options=options)
    return reward_factory(term.name)(term)


def score_images(reward: Reward, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
    """Call a reward the way the contract says: detached CPU float images, no grad."""
    if not (len(prompts) == len(targets) == images.shape[0]):
        raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts and {len(targets)} targets")
    with torch.no_grad():
        imgs = images.detach().float().cpu().clamp(0, 1)
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        return reward(imgs, prompts, targets).float()
