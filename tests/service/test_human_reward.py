"""The `human` reward: a tiny run trains on likes given by a simulated labeller through the labelling page (both in
subprocesses on loopback), and its rewards are exactly the labels in the store; without labels it times out to NaN,
the failure bound stops the run after a training state, and `--resume` picks up the labels given meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from servers import ROOT, LabelServer
from utils import TINY, TINY_TRAIN, tiny_run_files

from tdm_r1.commands.train import train
from tdm_r1.config import load_config
from tdm_r1.labels.sim import RULES
from tdm_r1.labels.store import LabelStore
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.rewards.wire import png_tensor


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("human_files"))


def config(files, run_dir, human: str, *extra: str):
    sets = [*TINY, *TINY_TRAIN, f"roles.teacher={files / 'teacher.safetensors'}",
            f"world.heldout_words={files / 'heldout.txt'}", f"run_dir={run_dir}", "train.epochs=2",
            f"train.rewards=[{{name: human, options: {human}}}]", "train.checkpoint_every=1", *extra]  # fmt: skip
    return load_config(None, sets)


def test_a_run_trains_on_the_simulated_labellers_likes(files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    page = LabelServer(tmp_path, run)
    sim = subprocess.Popen([sys.executable, "-m", "tdm_r1", "label-sim", "--run", str(run), "--rule", "dark",
                            "--max-seconds", "300"], cwd=ROOT, stdout=open(tmp_path / "sim.log", "w"),
                           stderr=subprocess.STDOUT)  # fmt: skip
    try:
        train(config(files, run, "{timeout_s: 60, poll_s: 0.05}"))
    finally:
        sim.terminate()
        sim.wait(60)
        page.stop()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    store = LabelStore.of_run(run)
    dark = RULES["dark"]()
    for row in rows:
        images = store.images(row["epoch"])
        assert len(images) == 4  # 2 prompts x 2 samples, in two chunks
        means = store.means([im.id for im in images])
        pixels = torch.stack([png_tensor(store.png(im.id), 0, 64) for im in images])
        assert [means[im.id] for im in images] == [float(x) for x in dark(pixels, [im.prompt for im in images])]
        assert row["reward_mean"] == pytest.approx(sum(means.values()) / 4)  # the reward is exactly those labels
        assert row["reward_failed"] == 0 and row["reward_human_timeouts"] == 0
    assert store.state()["status"] == "training" and store.labellers() == ["sim"]
    store.close()


def test_unlabelled_samples_time_out_and_resume_picks_up_labels_given_meanwhile(files, tmp_path):
    run = tmp_path / "run"
    human = "{timeout_s: 0.3, poll_s: 0.05}"
    with pytest.raises(RewardFailureError, match="epoch 1: 4 of 4 samples could not be scored"):
        train(config(files, run, human, "train.max_reward_failure=0.5"))
    store = LabelStore.of_run(run)
    images = store.images(1)
    assert len(images) == 4 and store.progress(1) == (0, 4)
    store.add_labeller("ann")
    for im, label in zip(images, (1, 0, 1, 1), strict=True):  # given while the trainer was down
        store.label(im.id, "ann", label)
    # resumed: epoch 1 redone with the same images, so their labels are found; epoch 2 times out to NaN (allowed)
    summary = train(config(files, run, human, "train.max_reward_failure=1.0"), resume="auto")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and summary["epochs"] == 2
    assert [im.id for im in store.images(1)] == [im.id for im in images]
    assert rows[0]["reward_mean"] == pytest.approx(0.75) and rows[0]["reward_failed"] == 0
    assert rows[1]["reward_failed"] == 4 and rows[1]["reward_human_timeouts"] == 2  # one per chunk of 2 samples
    store.close()
