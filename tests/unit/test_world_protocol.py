"""The World protocol: the toy OCR world and the prompt files of diffusers runs implement it, and a world defined
elsewhere (here, in this test) runs through sampling and evaluation without any change to them."""

from dataclasses import dataclass

import pytest
from utils import TINY

from tdm_r1.config import EvalConfig, load_config
from tdm_r1.evaluate import evaluate
from tdm_r1.models.tiny_dit import build_tiny_dit
from tdm_r1.rewards import build_reward
from tdm_r1.worlds.base import World
from tdm_r1.worlds.ocr import build_world
from tdm_r1.worlds.prompts import PromptWorld


@dataclass
class DotsWorld:
    """A test world: items are counts, prompts name them, the reward target is the count."""

    height: int = 16
    width: int = 64

    def words(self, split: str) -> list[str]:
        return {"train": ["1", "2"], "heldout": ["3", "4", "5"]}[split]

    def prompt(self, item: str) -> str:
        return f"{item} dots"

    def word_of(self, prompt: str) -> str:
        return prompt.split(" ")[0]

    def metadata_of(self, prompts: list[str]) -> list[dict] | None:
        return [{"count": int(self.word_of(p))} for p in prompts]


def test_the_shipped_worlds_implement_the_protocol():
    assert isinstance(build_world(load_config(None, []).world), World)
    assert isinstance(PromptWorld(["a"], ["b"], 64, 64), World)
    assert not isinstance(object(), World)


def test_a_new_world_plugs_into_evaluation_unchanged():
    cfg = load_config(None, TINY)
    world = DotsWorld()
    assert isinstance(world, World)
    model = build_tiny_dit(cfg.model, cfg.world).eval()
    seen = []

    def reward(images, prompts, metadata=None):  # records what the world handed to the reward
        seen.append((prompts, metadata))
        return build_reward("dark_fraction")(images, prompts, metadata)

    result, images = evaluate(model, world, reward, world.words("heldout"), 2, 1.0, 3.0, EvalConfig(), metric="reward")
    assert images.shape == (3, 3, 16, 64) and result["n"] == 3 and 0.0 <= result["reward_mean"] <= 1.0
    # the reward scored the world's prompts (evaluation hands metadata only through the train scorer)
    assert seen == [(["3 dots", "4 dots", "5 dots"], None)]
    assert result["reward_mean"] == pytest.approx(float(build_reward("dark_fraction")(images, [], None).mean()))
