"""The World protocol: the toy OCR world and the prompt files of diffusers runs implement it, and a world defined
elsewhere (tests/unit/dots_world.py) runs through sampling, evaluation and a whole train run without any change to
them, its reward receiving the items' targets."""

import json

import dots_world
import pytest
from dots_world import DotsWorld
from utils import TINY, save_tiny_teacher

from tdm_r1.commands.train import train
from tdm_r1.config import EvalConfig, load_config
from tdm_r1.evaluate import evaluate
from tdm_r1.models.tiny_dit import build_tiny_dit
from tdm_r1.rewards import build_reward
from tdm_r1.worlds import build_world
from tdm_r1.worlds.base import World
from tdm_r1.worlds.prompts import PromptWorld


def test_the_shipped_worlds_implement_the_protocol():
    assert isinstance(build_world(load_config(None, []).world), World)
    assert isinstance(build_world(load_config("configs/toy_counting_teacher.yaml").world), World)
    assert isinstance(PromptWorld(["a"], ["b"], 64, 64), World)
    assert not isinstance(object(), World)


def test_a_new_world_plugs_into_evaluation_unchanged():
    cfg = load_config(None, TINY)
    world = DotsWorld(16, 64)
    assert isinstance(world, World)
    model = build_tiny_dit(cfg.model, cfg.world).eval()
    seen = []

    def reward(images, prompts, targets):  # records what the world handed to the reward
        seen.append((prompts, targets))
        return build_reward("dark_fraction")(images, prompts, targets)

    result, images = evaluate(model, world, reward, world.items("heldout"), 2, 1.0, 3.0, EvalConfig(), metric="reward")
    assert images.shape == (2, 3, 16, 64) and result["n"] == 2 and 0.0 <= result["reward_mean"] <= 1.0
    # the reward scored the world's prompts against the items' targets
    assert seen == [(["4 dots", "5 dots"], [{"count": 4}, {"count": 5}])]
    assert result["reward_mean"] == pytest.approx(float(build_reward("dark_fraction")(images, [], []).mean()))


def test_a_world_and_a_reward_outside_the_package_train_by_name(tmp_path):
    """Nothing in tdm_r1 names the dots world or its reward: both come in by import path from the config."""
    save_tiny_teacher(tmp_path / "teacher.safetensors")
    sets = [
        *TINY,
        f"roles.teacher={tmp_path / 'teacher.safetensors'}",
        f"run_dir={tmp_path / 'run'}",
        "world.name=dots_world:build_dots_world",
        "world.options={heldout: ['4', '6']}",
        "train.rewards=[{name: 'dots_world:build_count_reward', weight: 1.0}]",
        "train.epochs=1",
        "train.prompts_per_epoch=2",
        "train.group_size=2",
        "train.micro_batch_groups=2",
        "train.eval_baselines=false",
        "train.tensorboard=false",
    ]
    dots_world.SEEN.clear()
    summary = train(load_config(None, sets))
    rollout_prompts, rollout_targets = dots_world.SEEN[0]  # the epoch's rollout: 2 train items x 2 samples, one chunk
    assert [int(p.split()[0]) for p in rollout_prompts] == [t["count"] for t in rollout_targets]
    assert {t["count"] for t in rollout_targets} <= {1, 2, 3} and len(rollout_targets) == 4
    assert dots_world.SEEN[-1][1][:2] == [{"count": 4}, {"count": 6}]  # the held-out items, scored at the end
    final = summary["tdm_r1_4nfe"]  # evaluated with the run's reward, not with OCR
    assert final["n"] == 2 and "reward_mean" in final and "ocr_mean" not in final
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 1
