"""Training with the `remote` reward: the same run as with the reward in-process, and a server lost in the middle of
a run stops it after a training state that `--resume` continues exactly once the server is back."""

from __future__ import annotations

import json

import pytest
from servers import TOKEN, Server
from utils import TINY, TINY_TRAIN, tiny_run_files, train_epochs

from tdm_r1 import checkpoint as ckpt
from tdm_r1.commands.train import train
from tdm_r1.config import load_config
from tdm_r1.rewards.base import RewardFailureError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("remote_files"))


def base_sets(files, run_dir):
    return [*TINY, *TINY_TRAIN, f"roles.teacher={files / 'teacher.safetensors'}",
            f"world.heldout_words={files / 'heldout.txt'}", f"run_dir={run_dir}"]  # fmt: skip


def same(a: dict, b: dict) -> dict:
    """The training figures of two metric rows (timings and the service's own figures left out)."""
    keys = {
        k for k in a if not k.startswith("sec_") and "latency" not in k and "retries" not in k and "chunks" not in k
    }
    return {k: (a[k], b.get(k)) for k in keys if a[k] != b.get(k)}


def test_remote_ocr_trains_exactly_as_local_ocr(files, tmp_path, monkeypatch):
    (tmp_path / "srv").mkdir()
    server = Server(tmp_path / "srv", "ocr")
    monkeypatch.setenv("TDM_R1_REWARD_TOKEN", TOKEN)
    rows = {}
    try:
        for kind, reward in (
            ("local", "{name: ocr}"),
            ("remote", f"{{name: remote, options: {{url: '{server.url}'}}}}"),
        ):
            rows[kind] = train_epochs([*base_sets(files, tmp_path / kind), f"train.rewards=[{reward}]"])
    finally:
        server.stop()
    for local, remote in zip(rows["local"], rows["remote"], strict=True):
        assert same(local, remote) == {}
    assert rows["remote"][0]["reward_remote_failed_chunks"] == 0 and rows["remote"][0]["reward_mean"] >= 0


def test_a_lost_server_stops_the_run_after_a_state_and_resume_matches_the_uninterrupted_run(
    files, tmp_path, monkeypatch
):
    monkeypatch.setenv("TDM_R1_REWARD_TOKEN", TOKEN)
    remote = "{name: remote, options: {url: 'URL', retries: 1, backoff_s: 0.01, timeout_s: 10}}"

    def cfg(run_dir, url, epochs=3):
        sets = [*base_sets(files, run_dir), f"train.rewards=[{remote.replace('URL', url)}]", f"train.epochs={epochs}",
                "train.checkpoint_every=1"]  # fmt: skip
        return load_config(None, sets)

    (tmp_path / "a").mkdir()
    server = Server(tmp_path / "a", "dark_fraction")
    try:
        train(cfg(tmp_path / "whole", server.url))
    finally:
        server.stop()
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # 2 scoring requests per epoch (two micro-batches of one group): the server answers epoch 1 and stops
    (tmp_path / "b").mkdir()
    server = Server(tmp_path / "b", "dark_fraction", "--max-requests", "2")
    port = server.url.rsplit(":", 1)[1]
    with pytest.raises(RewardFailureError, match=rf"epoch 2: 4 of 4 samples.*127.0.0.1:{port}.*after 2 tries"):
        train(cfg(tmp_path / "cut", server.url))
    server.stop()
    assert [s.name for s in ckpt.list_train_states(tmp_path / "cut")][-1].startswith("state_000001")
    (tmp_path / "c").mkdir()
    server = Server(tmp_path / "c", "dark_fraction", "--port", port)  # back, where it was
    try:
        train(cfg(tmp_path / "cut", server.url), resume="auto")
    finally:
        server.stop()
    cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    for a, b in zip(whole, cut, strict=True):
        assert same(a, b) == {}, a["epoch"]
