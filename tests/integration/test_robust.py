"""Runs that survive what goes wrong: a flipped bit in a training state is refused and --resume falls back to the
newest state that verifies; non-finite losses and gradients are skipped and counted, never trained on or written; a
reward that raises fails its chunk instead of the run; SIGTERM stops a run cleanly with a state that resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from utils import TINY, TINY_DISTILL, TINY_TRAIN, tiny_run_files

from tdm_r1 import checkpoint as ckpt
from tdm_r1 import updates
from tdm_r1.commands.distill import distill
from tdm_r1.commands.train import train
from tdm_r1.config import load_config
from tdm_r1.optim import NonFiniteError, check_finite, optimizer_step
from tdm_r1.rewards import register_reward
from tdm_r1.run import build_run

DISTILL, TRAIN = TINY_DISTILL, TINY_TRAIN


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("teacher"))


def sets(teacher, run_dir, command, *extra):
    base = [*TINY, f"roles.teacher={teacher / 'teacher.safetensors'}", f"world.heldout_words={teacher / 'heldout.txt'}"]
    return [*base, *(DISTILL if command == "distill" else TRAIN), f"run_dir={run_dir}", *extra]


def flip_a_bit(path, tensor_name):
    """Flip one bit inside the bytes of one tensor of a safetensors file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    start = 8 + header_len + header[tensor_name]["data_offsets"][0]
    data[start] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_and_resume_falls_back(teacher, tmp_path, capsys):
    distill(load_config(None, sets(teacher, tmp_path, "distill", "distill.steps=3")))
    states = ckpt.list_train_states(tmp_path)
    from safetensors import safe_open

    with safe_open(str(states[-1]), framework="pt") as f:
        moment = next(k for k in f.keys() if k.startswith("/optim/fake"))  # an Adam moment of the fake score
    flip_a_bit(states[-1], moment)
    with pytest.raises(ckpt.CorruptStateError, match="do not match the checksum"):
        ckpt.read_train_state(states[-1])
    capsys.readouterr()
    distill(load_config(None, sets(teacher, tmp_path, "distill", "distill.steps=3")), resume="auto")
    out = capsys.readouterr().out
    assert (
        f"resume: skipped {states[-1]}" in out and "state_000002.safetensors is the newest state that verifies" in out
    )
    assert ckpt.read_train_state(states[-1])[0]["step"] == 3  # rewritten by the resumed run, whole again


def test_non_finite_gradients_skip_the_step_and_weights_stay_finite():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert torch.isnan(torch.tensor(optimizer_step(opt, [w], 1.0)))
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None and not opt.state  # no step, no moments


def test_a_nan_loss_is_skipped_counted_and_never_written(teacher, tmp_path, monkeypatch):
    """The surrogate's loss made NaN: its backward is skipped every time (counted in the metrics), its weights stay
    the initial ones, and the states and the export are finite."""
    real = updates.surrogate_loss
    monkeypatch.setattr(updates, "surrogate_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = load_config(None, sets(teacher, tmp_path, "train", "train.epochs=2"))
    before = {k: p.detach().clone() for k, p in build_run(cfg).roles.state_params().items() if "surrogate" in k}
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    m = cfg.tdm.steps_per_batch * 2  # drawn steps x micro-batches: one skipped backward each (no gradient, no step)
    assert [r["nonfinite_skipped"] for r in rows] == [m, m]
    state, _ = ckpt.read_train_state(ckpt.list_train_states(tmp_path)[-1])
    after = {k[len("surrogate/") :]: v for k, v in state["roles"].items() if k.startswith("surrogate/")}
    assert after and all(torch.equal(after[k], before[f"surrogate/{k}"]) for k in after)
    assert all(torch.isfinite(t).all() for t in state["roles"].values())


def test_non_finite_weights_are_never_saved_or_exported(teacher, tmp_path):
    run = build_run(load_config(None, sets(teacher, tmp_path, "train")))
    check_finite(run.roles, "a state")
    with torch.no_grad():
        next(iter(run.roles.generator.parameters())).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="the weights of generator are not finite; nothing was written"):
        check_finite(run.roles, "a state")


@register_reward("fails_every_other_call")
def _flaky(term):
    calls = []

    def reward(images, prompts, targets):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("the scoring service went away")
        return torch.ones(images.shape[0])

    return reward


def test_a_reward_that_raises_fails_its_chunk_not_the_run(teacher, tmp_path, caplog):
    extra = ["train.epochs=1", "train.rewards=[{name: fails_every_other_call}]", "train.max_reward_failure=0.5"]
    train(load_config(None, sets(teacher, tmp_path, "train", *extra)))
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["reward_failed"] == 2  # the second of two micro-batch chunks: its 2 samples are NaN, counted
    assert "the scoring service went away" in caplog.text


def test_sigterm_stops_cleanly_and_the_resumed_run_equals_the_uninterrupted_one(teacher, tmp_path):
    full = sets(teacher, tmp_path / "full", "distill", "distill.steps=40")
    distill(load_config(None, full))
    args = [x for s in sets(teacher, tmp_path / "cut", "distill", "distill.steps=40") for x in ("--set", s)]
    cmd = [sys.executable, "-m", "tdm_r1", "distill", "--config", str(teacher / "run.yaml"), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=os.getcwd())
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not log.is_file() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "distill: stopped by SIGTERM after step" in err and "--resume" in err
    stopped_at = ckpt.read_train_state(ckpt.list_train_states(tmp_path / "cut")[-1])[0]["step"]
    assert 3 <= stopped_at < 40
    distill(load_config(None, sets(teacher, tmp_path / "cut", "distill", "distill.steps=40")), resume="auto")
    a, _, _, _ = ckpt.read_model(tmp_path / "full" / "student.safetensors")
    b, _, _, _ = ckpt.read_model(tmp_path / "cut" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}  # noqa: E731
    rows = lambda d: [strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")


def test_pretrain_resume_equals_the_uninterrupted_run(tmp_path):
    base = [*TINY, "pretrain.batch_size=2", "pretrain.log_every=1", "pretrain.warmup_steps=2", "pretrain.save_every=2"]
    from tdm_r1.commands.pretrain import pretrain

    pretrain(load_config("configs/toy_ocr_teacher.yaml", [*base, "pretrain.steps=5", f"run_dir={tmp_path / 'full'}"]))
    cut = [*base, f"run_dir={tmp_path / 'cut'}"]
    pretrain(load_config("configs/toy_ocr_teacher.yaml", [*cut, "pretrain.steps=3"]))  # a run stopped after step 3
    (tmp_path / "cut" / "teacher.safetensors").unlink()
    pretrain(load_config("configs/toy_ocr_teacher.yaml", [*cut, "pretrain.steps=5"]), resume="auto")  # from step 2
    a, _, _, _ = ckpt.read_model(tmp_path / "full" / "teacher.safetensors")
    b, _, _, _ = ckpt.read_model(tmp_path / "cut" / "teacher.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    rows = lambda d: [strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "full") == rows(tmp_path / "cut") and len(rows(tmp_path / "full")) == 5
