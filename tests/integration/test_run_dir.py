"""The run directory's lifecycle, shared by pretrain, distill and train: one process at a time (a dead holder's lock
is recovered), an earlier run archived only after the whole config validated, leftovers of interrupted writes
removed, a torn last log line repaired on resume; and config errors caught before any file is touched."""

import json
import os
import signal
import subprocess
import sys

import pytest
from utils import TINY, TINY_DISTILL, TINY_TRAIN, tiny_run_files

from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main
from tdm_r1.commands.distill import distill
from tdm_r1.commands.train import train
from tdm_r1.config import load_config
from tdm_r1.run import RunDirBusyError, run_dir_lock

DISTILL, TRAIN = TINY_DISTILL, TINY_TRAIN


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("teacher"))


def cfg_of(teacher, run_dir, *extra, command="distill"):
    sets = DISTILL if command == "distill" else TRAIN
    base = [*TINY, f"roles.teacher={teacher / 'teacher.safetensors'}", f"world.heldout_words={teacher / 'heldout.txt'}"]
    return load_config(None, [*base, *sets, f"run_dir={run_dir}", *extra])


def steps(run_dir, key="step"):
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_distill_into_a_used_directory_archives_the_earlier_run(teacher, tmp_path):
    distill(cfg_of(teacher, tmp_path, "distill.steps=3"))
    old = (tmp_path / "student.safetensors").read_bytes()
    distill(cfg_of(teacher, tmp_path, "distill.steps=2", "seed=1"))
    assert steps(tmp_path) == [1, 2] and steps(tmp_path / "previous_1") == [1, 2, 3]
    assert (tmp_path / "previous_1" / "student.safetensors").read_bytes() == old
    # the new run's states are its own: resume continues it, not the archived one
    assert [p.name for p in ckpt.list_train_states(tmp_path)] == [
        "state_000001.safetensors",
        "state_000002.safetensors",
    ]
    distill(cfg_of(teacher, tmp_path, "distill.steps=3", "seed=1"), resume="auto")
    assert steps(tmp_path) == [1, 2, 3] and not (tmp_path / "previous_2").exists()


def test_a_fresh_pretrain_does_not_append_to_the_earlier_log(teacher, tmp_path):
    sets = [*TINY, "pretrain.steps=2", "pretrain.batch_size=2", "pretrain.log_every=1", "pretrain.warmup_steps=1"]
    run = ["--set", f"run_dir={tmp_path}"] + [x for s in sets for x in ("--set", s)]
    assert main(["pretrain", "--config", "configs/toy_ocr_teacher.yaml", *run]) == 0
    assert main(["pretrain", "--config", "configs/toy_ocr_teacher.yaml", *run]) == 0
    assert steps(tmp_path) == [1, 2] and steps(tmp_path / "previous_1") == [1, 2]


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_recovered(tmp_path):
    with run_dir_lock(tmp_path):
        with pytest.raises(RunDirBusyError, match=rf"{tmp_path} is in use by pid {os.getpid()} on host "):
            with run_dir_lock(tmp_path):
                pass
    code = (
        f"from tdm_r1.run import run_dir_lock\nwith run_dir_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
    )
    code += "    import time; time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            with run_dir_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(tmp_path):  # the dead holder's lock went with it
        pass


def test_two_trainers_into_one_directory(teacher, tmp_path, capsys):
    """The second `train` into a running run's directory exits 2 naming the holder and moves nothing."""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with run_dir_lock(tmp_path):
        sets = [x for s in [*TINY, *TRAIN, f"roles.teacher={teacher / 'teacher.safetensors'}"] for x in ("--set", s)]
        args = ["train", "--config", str(teacher / "run.yaml"), *sets, "--set", f"run_dir={tmp_path}"]
        args += ["--set", f"world.heldout_words={teacher / 'heldout.txt'}"]
        assert main(args) == 2
    assert f"is in use by pid {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / "previous_1").exists() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("train.rewards=[{name: nope, weight: 1.0}]", "unknown reward 'nope'"),
        ("train.epochs=0", r"train.epochs = 0 is out of range: it must be >= 1"),
        ("train.group_size=1", r"train.group_size = 1 is out of range: it must be >= 2"),
        ("train.prompts_per_epoch=0", r"train.prompts_per_epoch = 0 is out of range"),
        ("train.micro_batch_groups=0", r"train.micro_batch_groups = 0 is out of range"),
        (
            "train.max_reward_failure=-0.1",
            r"train.max_reward_failure = -0.1 is out of range: it must be in \[0.0, 1.0\]",
        ),
        ("train.adv_eps=0", r"train.adv_eps = 0.0 is out of range: it must be > 0"),
        ("world.prompt_template='a very long sign that says {word} and more'", "more than model.text_len=32"),
    ],
)
def test_config_errors_come_before_any_file_is_touched(teacher, tmp_path, extra, message):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # an earlier run
    with pytest.raises(ValueError, match=message):
        train(cfg_of(teacher, tmp_path, extra, command="train"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # nothing archived, locked or written


def test_overlapping_word_lists_are_a_clean_cli_error(teacher, tmp_path, capsys):
    (tmp_path / "w.txt").write_text("CAT\nBIRD\n")
    args = ["train", "--config", str(teacher / "run.yaml"), "--set", f"roles.teacher={teacher / 'teacher.safetensors'}"]
    args += [
        "--set",
        f"world.train_words={tmp_path / 'w.txt'}",
        "--set",
        f"world.heldout_words={teacher / 'heldout.txt'}",
    ]
    args += [x for s in [*TINY, *TRAIN, f"run_dir={tmp_path / 'run'}"] for x in ("--set", s)]
    assert main(args) == 2
    assert "world.train_words and world.heldout_words overlap in 1 words, e.g. ['CAT']" in capsys.readouterr().err


def test_a_checkpoint_claiming_another_model_kind_is_refused(teacher, tmp_path):
    state, model_cfg, world_cfg, _ = ckpt.read_model(teacher / "teacher.safetensors")
    model_cfg.kind = "sd3"
    ckpt.save_model(tmp_path / "x.safetensors", state, model_cfg, world_cfg)
    with pytest.raises(ckpt.CheckpointError, match="metadata says model.kind 'sd3'"):
        ckpt.load_model(tmp_path / "x.safetensors")


def test_leftovers_of_interrupted_writes_are_removed_and_a_torn_log_line_repaired(teacher, tmp_path):
    cfg = cfg_of(teacher, tmp_path, "distill.steps=2")
    distill(cfg)
    leftover = tmp_path / "checkpoints" / f".state_000003.safetensors.tmp-{os.getpid() + 1}"
    leftover.write_bytes(b"\0" * 1000)  # what a kill during a state write leaves
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss_ge')  # and a kill during a log write
    distill(cfg_of(teacher, tmp_path, "distill.steps=3"), resume="auto")
    assert not leftover.exists() and steps(tmp_path) == [1, 2, 3]  # every line of the resumed run's log parses


def test_eval_with_a_prompt_file_works_outside_the_repository(teacher, tmp_path, monkeypatch):
    (tmp_path / "words.txt").write_text("CAT\nDOG\n")
    monkeypatch.chdir(tmp_path)  # the checkpoint's word lists (configs/words/...) are not reachable from here
    args = ["eval", "--checkpoint", str(teacher / "teacher.safetensors"), "--prompts", "words.txt", "--nfe", "1"]
    assert main([*args, "--out", "ev.json", "--set", "eval.batch_size=2"]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["n"] == 2


def test_an_unwritable_eval_output_fails_before_the_evaluation(teacher, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = ["eval", "--checkpoint", str(teacher / "teacher.safetensors"), "--out", str(tmp_path / "file" / "ev.json")]
    assert main(args) == 2
    assert f"cannot write {tmp_path / 'file' / 'ev.json'}" in capsys.readouterr().err


def test_export_refuses_an_existing_output_unless_told(teacher, tmp_path, capsys):
    distill(cfg_of(teacher, tmp_path / "run", "distill.steps=1"))
    out = tmp_path / "model.safetensors"
    out.write_text("precious")
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]
    assert main(args) == 2 and out.read_text() == "precious"
    assert f"--out {out} exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and ckpt.read_model(out)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_huge_bad_line_is_not_echoed_whole(tmp_path):
    from tdm_r1.worlds.ocr import PromptFileError, read_words

    (tmp_path / "w.txt").write_text("CAT\n" + "a" * 2_000_000 + "\n")
    with pytest.raises(PromptFileError) as e:
        read_words(tmp_path / "w.txt", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", 8)
    assert len(str(e.value)) < 300 and "(2000000 characters)" in str(e.value)
