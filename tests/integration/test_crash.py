"""Crash harness: a tiny `train`, `distill` and `pretrain` are SIGKILLed at moments chosen from their own progress
(tests/crash_harness.py), then resumed with --resume: the result's weights and every metrics row equal an
uninterrupted run's bitwise, no temporary file is left, and nothing before the last state is lost. The default suite
tries a few kill points per command; `make test-crash` (marked slow) tries every moment at several occurrences."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import TINY, tiny_run_files

from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["seed=0", *TINY]
ARGS = {
    "train": [
        "train.epochs=3",
        "train.prompts_per_epoch=2",
        "train.group_size=2",
        "train.micro_batch_groups=1",
        "train.checkpoint_every=1",
        "train.eval_every=0",
        "train.eval_baselines=false",
        "train.tensorboard=false",
        "train.rewards=[{name: dark_fraction, weight: 1.0}]",
    ],
    "distill": [
        "distill.steps=4",
        "distill.batch_size=2",
        "distill.checkpoint_every=1",
        "distill.eval_every=0",
        "distill.eval_at_end=false",
    ],
    "pretrain": [
        "pretrain.steps=5",
        "pretrain.batch_size=2",
        "pretrain.save_every=1",
        "pretrain.log_every=1",
        "pretrain.warmup_steps=2",
    ],
}
RESULT = {"train": "generator.safetensors", "distill": "student.safetensors", "pretrain": "teacher.safetensors"}
# (command, moment, occurrence): the default suite's kill points
KILLS = [
    ("train", "rollout", 3),  # epoch 2's sampling
    ("train", "update", 5),  # epoch 2's first fake-score backward (2 micro-batches x M = 2 per epoch)
    ("train", "state_write", 2),
    ("train", "log_write", 2),
    ("train", "export", 1),
    ("distill", "update", 5),
    ("distill", "state_write", 3),
    ("distill", "log_write", 2),
    ("pretrain", "step", 4),
    ("pretrain", "state_write", 2),
    ("pretrain", "export", 1),
]
# Each moment's occurrences in the runs of ARGS: train 3 epochs x 2 micro-batches (x M = 2 drawn steps), distill 4
# steps x M = 2, pretrain 5 steps (a state after each but the last).
MOMENTS = {
    "train": {"rollout": 6, "update": 12, "state_write": 3, "log_write": 3, "export": 1},
    "distill": {"update": 8, "state_write": 4, "log_write": 4, "export": 1},
    "pretrain": {"step": 5, "state_write": 4, "log_write": 5, "export": 1},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("crash"))


def argv(command: str, files: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [*COMMON, *ARGS[command], f"run_dir={run_dir}", f"world.heldout_words={files / 'heldout.txt'}"]
    if command != "pretrain":
        sets.append(f"roles.teacher={files / 'teacher.safetensors'}")
    return [command, "--config", str(files / "run.yaml"), *(x for s in sets for x in ("--set", s)), *extra]


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = {}
    for command in ARGS:
        run_dir = tmp_path_factory.mktemp(f"full_{command}")
        assert main(argv(command, files, run_dir)) == 0
        out[command] = run_dir
    return out


def rows(run_dir: Path) -> list[dict]:
    timing = ("sec_", "seconds")
    return [
        {k: v for k, v in json.loads(x).items() if not k.startswith(timing)}
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def crash_and_resume(files: Path, reference: Path, run_dir: Path, command: str, moment: str, n: int) -> None:
    child = [sys.executable, str(ROOT / "tests" / "crash_harness.py"), moment, str(n), *argv(command, files, run_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"{command} {moment} {n}: not killed (rc {proc.returncode})\n{proc.stderr[-2000:]}"
    if ckpt.list_train_states(run_dir):
        assert main(argv(command, files, run_dir, "--resume")) == 0
    else:  # killed before its first state: --resume says so, and a fresh run starts over (the crashed one archived)
        assert main(argv(command, files, run_dir, "--resume")) == 2
        assert main(argv(command, files, run_dir)) == 0
    a, _, _, _ = ckpt.read_model(reference / RESULT[command])
    b, _, _, _ = ckpt.read_model(run_dir / RESULT[command])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{command} {moment} {n}: weights"
    assert rows(run_dir) == rows(reference), f"{command} {moment} {n}: metrics rows"
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"{command} {moment} {n}: left {leftovers}"


@pytest.mark.parametrize(("command", "moment", "n"), KILLS, ids=[f"{c}-{m}-{n}" for c, m, n in KILLS])
def test_a_killed_run_resumes_to_the_uninterrupted_result(files, uninterrupted, tmp_path, command, moment, n):
    crash_and_resume(files, uninterrupted[command], tmp_path, command, moment, n)


@pytest.mark.slow
def test_many_random_kill_points(files, uninterrupted, tmp_path):
    """`make test-crash`: every moment of every command at random occurrences (seeded; the count is printed)."""
    rng = random.Random(int(os.environ.get("TDM_R1_CRASH_SEED", "0")))
    tried = 0
    for command, moments in MOMENTS.items():
        for moment, count in moments.items():
            choices = range(1, count + 1)
            for n in sorted(rng.sample(choices, k=min(2, len(choices)))):
                crash_and_resume(
                    files, uninterrupted[command], tmp_path / f"{command}_{moment}_{n}", command, moment, n
                )
                tried += 1
    print(f"crash harness: {tried} kill points tried; every resumed run equals the uninterrupted one")
