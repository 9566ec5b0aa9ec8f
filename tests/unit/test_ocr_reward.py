import numpy as np
import pytest
import torch

from tdm_r1.config import WorldConfig
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.base import score_images
from tdm_r1.rewards.ocr import edit_distance, ocr_score
from tdm_r1.worlds.ocr import build_world


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def reward(world):
    return build_reward("ocr")


def prompts_and_targets(world, words):
    return [world.prompt(w) for w in words], world.targets(words)


def test_edit_distance_and_score_hand_cases():
    assert edit_distance("KITTEN", "SITTING") == 3
    assert edit_distance("", "ABC") == 3
    assert ocr_score("HELLO", "HELLO") == 1.0
    assert ocr_score("hel lo", "HELLO") == 1.0  # normalised: case and spaces
    assert ocr_score("HELO", "HELLO") == pytest.approx(0.8)
    assert ocr_score("", "CAT") == 0.0
    assert ocr_score("XXXXXXXXXX", "CAT") == 0.0  # distance capped at len(word)


def test_clean_renders_score_high(world, reward):
    words = world.heldout_words[:48]
    imgs = world.render_batch(words, np.random.default_rng(0))
    scores = score_images(reward, imgs, [world.prompt(w) for w in words], world.targets(words))
    assert scores.shape == (48,)
    assert scores.mean() >= 0.95


def test_blank_images_score_zero(world, reward):
    blank = torch.full((8, 3, 16, 64), 0.85)
    scores = score_images(reward, blank, *prompts_and_targets(world, world.heldout_words[:8]))
    assert torch.all(scores == 0)


def test_wrong_word_scores_below_one(world, reward):
    imgs = world.render_batch(["HOUSE", "TRAIN"], np.random.default_rng(0))
    scores = score_images(reward, imgs, *prompts_and_targets(world, ["MOUSE", "QZX"]))
    assert scores[0] == pytest.approx(0.8)  # one substitution in five letters
    assert scores[1] < 0.5


def test_tiled_reading_equals_single_reading(world, reward):
    words = ["CAT", "JUMPS", "QUIZ"]
    imgs = world.render_batch(words, np.random.default_rng(1)).expand(-1, 3, -1, -1)
    assert reward.read(imgs, tiled=True) == reward.read(imgs, tiled=False) == words


def test_reward_is_not_differentiable_by_contract(world, reward):
    imgs = world.render_batch(["CAT"], np.random.default_rng(0)).requires_grad_(True)
    out = score_images(reward, imgs, *prompts_and_targets(world, ["CAT"]))
    assert not out.requires_grad
