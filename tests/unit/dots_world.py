"""A world and a reward that live outside the package (tests/unit/test_world_protocol.py): plugged into a run by
`world.name: dots_world:build_dots_world` and `train.rewards: [{name: dots_world:build_count_reward}]`, with no line
changed anywhere in tdm_r1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SEEN: list[tuple[list[str], list[dict]]] = []  # what the reward was handed, call by call


@dataclass
class DotsWorld:
    """Items are requested counts; the prompt names the count; the reward target is the count."""

    height: int
    width: int
    train: list[str] = field(default_factory=lambda: ["1", "2", "3"])
    heldout: list[str] = field(default_factory=lambda: ["4", "5"])

    def items(self, split: str) -> list[str]:
        return {"train": self.train, "heldout": self.heldout}[split]

    def prompt(self, item: str) -> str:
        return f"{item} dots"

    def targets(self, items: list[str]) -> list[dict]:
        return [{"count": int(i)} for i in items]


def build_dots_world(cfg) -> DotsWorld:
    return DotsWorld(cfg.height, cfg.width, **cfg.options)


class CountReward:
    """1 - |dark pixels / 100 - count| / count: judged against the target, never against the prompt text."""

    name = "count"

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        SEEN.append((list(prompts), list(targets)))
        dark = (images.mean(1) < 0.5).flatten(1).sum(1).float() / 100
        want = torch.tensor([float(t["count"]) for t in targets])
        return 1 - (dark - want).abs() / want


def build_count_reward(term) -> CountReward:
    return CountReward()
