"""train.gold, the guard against reward hacking: a reward the run never trains on, scored on every evaluation's
held-out samples; the best generator by gold kept; a warning when the training reward rises while gold falls."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from utils import TINY, TINY_TRAIN, tiny_run_files

from tdm_r1 import checkpoint as ckpt
from tdm_r1.commands.train import hacking_suspected, train
from tdm_r1.config import ConfigError, load_config
from tdm_r1.rewards import register_reward


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("gold_files"))


def cfg(files, run_dir, *extra):
    sets = [*TINY, *TINY_TRAIN, f"roles.teacher={files / 'teacher.safetensors'}", "train.eval_every=1",
            f"world.heldout_words={files / 'heldout.txt'}", f"run_dir={run_dir}", *extra]  # fmt: skip
    return load_config(None, sets)


def test_suspicion_needs_two_intervals_of_rising_reward_and_falling_gold():
    assert not hacking_suspected([(1, 0.1, 0.9), (2, 0.2, 0.8)])  # one interval is not enough
    assert hacking_suspected([(1, 0.1, 0.9), (2, 0.2, 0.8), (3, 0.3, 0.7)])
    assert not hacking_suspected([(1, 0.1, 0.9), (2, 0.2, 0.8), (3, 0.3, 0.85)])  # gold recovered
    assert not hacking_suspected([(1, 0.1, 0.9), (2, 0.2, 0.8), (3, 0.15, 0.7)])  # the reward fell too
    assert not hacking_suspected([(1, 0.1, 0.9), (2, 0.2, 0.8), (3, float("nan"), 0.7)])


def test_gold_must_be_a_reward_the_run_does_not_train_on(files, tmp_path):
    from tdm_r1.run import build_run

    with pytest.raises(ConfigError, match=r"train.gold \(dark_fraction\) is also in train.rewards"):
        build_run(cfg(files, tmp_path, "train.gold=[{name: dark_fraction}]"))
    with pytest.raises(ConfigError, match="train.gold holds at most one reward, got 2"):
        build_run(cfg(files, tmp_path, "train.gold=[{name: ocr}, {name: pickscore}]"))


def test_gold_scores_every_evaluation_and_keeps_the_best_generator(files, tmp_path):
    summary = train(cfg(files, tmp_path, "train.epochs=3", "train.gold=[{name: ocr}]"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # gold is OCR here, on the very samples the evaluation's OCR read: the two agree exactly
    for r in rows[:2]:
        assert r["heldout_gold_mean"] == pytest.approx(r["heldout_ocr_mean"], abs=1e-9)
    gold = summary["gold"]
    assert [h["epoch"] for h in gold["history"]] == [1, 2, 3]  # two in-run evaluations and the final one
    assert gold["history"][-1]["gold"] == pytest.approx(summary["tdm_r1_4nfe"]["gold_mean"])
    best = max(h["gold"] for h in gold["history"])
    assert gold["best"] == best and gold["best_epoch"] == next(h["epoch"] for h in gold["history"] if h["gold"] == best)
    weights, _, _, info = ckpt.read_model(tmp_path / "generator_best_gold.safetensors")
    assert info["epoch"] == gold["best_epoch"] and weights
    assert "Gold reward `ocr` (never trained on)" in (tmp_path / "report.md").read_text()


def test_a_rising_reward_with_falling_gold_is_reported(files, tmp_path):
    calls, gold_calls = itertools.count(), itertools.count()

    @register_reward("rising_for_gold_test")
    def _rising(term):  # the training reward climbs epoch after epoch (2 scoring calls per epoch)
        return lambda images, prompts, targets: torch.full((images.shape[0],), 0.1 * (next(calls) // 2))

    @register_reward("falling_gold_for_test")
    def _falling(term):  # what a person would say gets worse at every evaluation
        return lambda images, prompts, targets: torch.full((images.shape[0],), 1.0 - 0.1 * next(gold_calls))

    sets = [
        "train.epochs=4",
        "train.rewards=[{name: rising_for_gold_test}]",
        "train.gold=[{name: falling_gold_for_test}]",
    ]
    summary = train(cfg(files, tmp_path, *sets))
    gold = summary["gold"]
    assert [round(h["gold"], 6) for h in gold["history"]] == [1.0, 0.9, 0.8, 0.7]
    assert gold["warnings"] == [3, 4] and gold["best_epoch"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[2].get("gold_warning") == 1 and "gold_warning" not in rows[1]
    assert "**Warning (epoch 3):**" in (tmp_path / "report.md").read_text()
