"""TDM distillation loop: what each step trains, exact resume, checkpoint safety, CLI."""

import json
import os

import pytest
import torch
from utils import TINY, role_named_parameters, save_tiny_teacher

from tdm_r1 import checkpoint as ckpt
from tdm_r1.cli import main
from tdm_r1.commands.distill import distill
from tdm_r1.config import load_config
from tdm_r1.phases import distill_step
from tdm_r1.run import build_run
from tdm_r1.worlds.ocr import build_world
from tdm_r1.worlds.stream import PromptStream

RUN = ["distill.batch_size=3", "distill.eval_every=0", "distill.eval_at_end=false", "distill.checkpoint_every=2"]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_tiny_teacher(path)
    return path


def make_cfg(teacher_path, run_dir, *extra):
    return load_config(None, [*TINY, *RUN, f"roles.teacher={teacher_path}", f"run_dir={run_dir}", *extra])


def read_metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(rec):
    return {k: v for k, v in rec.items() if not k.startswith("seconds")}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_steps_change_every_trainable_parameter_and_no_frozen_one(mode, teacher_path, tmp_path):
    # no weight decay: a parameter may only move because its gradient is non-zero
    cfg = make_cfg(teacher_path, tmp_path, f"roles.mode={mode}", "optim.weight_decay=0.0")
    run = build_run(cfg, "distill")
    roles, opts = run.roles, run.opts
    assert set(opts) == {"generator", "fake"}
    host = roles.host.model if mode == "lora" else None
    everything = {f"{n}/{k}": p for n, r in roles.active().items() for k, p in role_named_parameters(r, host)}
    before = {k: p.detach().clone() for k, p in everything.items()}
    world, stream, gen = build_world(cfg.world), PromptStream(["CAT", "DOG", "QUIZ"], 0), torch.Generator()
    gen.manual_seed(0)
    for _ in range(2):
        distill_step(roles, opts, world, stream, cfg, gen)
    trainable = {id(p) for ps in roles.trainable().values() for p in ps}
    shadow = {id(p) for p in roles.generator_ema.parameters()}
    changed = {k for k, p in everything.items() if not torch.equal(p, before[k])}
    for k, p in everything.items():
        if id(p) in trainable or id(p) in shadow:  # the EMA copy follows the generator
            assert k in changed, f"trainable {k} did not change"
        else:
            assert k not in changed, f"frozen {k} changed"
    assert {k.split("/")[0] for k in changed} == {"generator", "fake", "generator_ema"}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(mode, teacher_path, tmp_path):
    full = distill(make_cfg(teacher_path, tmp_path / "full", f"roles.mode={mode}", "distill.steps=4"))
    half_cfg = make_cfg(teacher_path, tmp_path / "half", f"roles.mode={mode}", "distill.steps=2")
    distill(half_cfg)
    resumed = distill(make_cfg(teacher_path, tmp_path / "half", f"roles.mode={mode}", "distill.steps=4"), "auto")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
    assert full["steps"] == resumed["steps"] == 4
    sa, _, _, _ = ckpt.read_model(tmp_path / "full" / "student.safetensors")
    sb, _, _, _ = ckpt.read_model(tmp_path / "half" / "student.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_student_is_a_model_checkpoint_of_the_ema_generator(teacher_path, tmp_path):
    distill(make_cfg(teacher_path, tmp_path, "distill.steps=2"))
    student, world_cfg, info = ckpt.load_model(tmp_path / "student.safetensors")
    assert info["kind"] == "student" and info["nfe"] == 4 and info["step"] == 2
    assert ckpt.read_adapter(tmp_path / "student_adapter.safetensors", load_config(None).roles)
    fake = ckpt.read_adapter(tmp_path / "student_fake_adapter.safetensors", load_config(None).roles)
    assert fake.keys() == ckpt.read_adapter(tmp_path / "student_adapter.safetensors", load_config(None).roles).keys()
    assert any(t.abs().sum() > 0 for k, t in fake.items() if "lora_B" in k)  # the trained fake, not a fresh adapter
    teacher = ckpt.load_model(teacher_path)[0]
    x, s = torch.randn(2, 1, 16, 64), torch.tensor([1.0, 0.5])
    cond = teacher.encode_prompts(["a", "b"])
    assert not torch.allclose(student.velocity(x, s, cond), teacher.velocity(x, s, cond), atol=1e-6)


def test_truncated_checkpoint_is_refused_and_the_previous_kept(teacher_path, tmp_path):
    distill(make_cfg(teacher_path, tmp_path, "distill.steps=4"))
    states = ckpt.list_train_states(tmp_path)
    assert [p.name for p in states] == ["state_000002.safetensors", "state_000004.safetensors"]
    data = states[1].read_bytes()
    states[1].write_bytes(data[: len(data) // 2])
    # named explicitly, the damaged state is refused, with the previous one checked and offered
    with pytest.raises(ckpt.CorruptStateError, match=r"truncated or corrupt.*previous state .*state_000002.* verifies"):
        distill(make_cfg(teacher_path, tmp_path, "distill.steps=6"), str(states[1]))
    assert ckpt.read_train_state(states[0])[0]["step"] == 2
    # --resume (auto) skips it, says so, and continues from the newest state that verifies
    summary = distill(make_cfg(teacher_path, tmp_path, "distill.steps=4"), "auto")
    assert summary["steps"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "state.safetensors"
    ckpt.save_train_state(path, {"step": 1, "w": torch.ones(3)})

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(path, crash)
    state, _ = ckpt.read_train_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["state.safetensors"]


def test_foreign_files_and_changed_configs_are_refused(teacher_path, tmp_path):
    distill(make_cfg(teacher_path, tmp_path, "distill.steps=2"))
    with pytest.raises(ckpt.CheckpointError, match="not a tdm-r1 training-state checkpoint"):
        distill(make_cfg(teacher_path, tmp_path, "distill.steps=4"), str(teacher_path))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        distill(make_cfg(teacher_path, tmp_path, "distill.steps=4"), str(tmp_path / "junk.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="optim.generator_lr"):
        distill(make_cfg(teacher_path, tmp_path, "distill.steps=4", "optim.generator_lr=1.0"), "auto")
    with pytest.raises(ckpt.CheckpointError, match="no training-state checkpoint"):
        distill(make_cfg(teacher_path, tmp_path / "empty", "distill.steps=4"), "auto")


def test_cli_distill(teacher_path, tmp_path, capsys):
    args = ["distill", "--config", "configs/toy_ocr_distill.yaml"]
    sets = [*TINY, *RUN, f"roles.teacher={teacher_path}", f"run_dir={tmp_path}", "distill.steps=2"]
    assert main([*args, *sum((["--set", o] for o in sets), [])]) == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "student.safetensors").is_file()
    assert main([*args, *sum((["--set", o] for o in sets), []), "--set", "distill.steps=3", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert main([*args, *sum((["--set", o] for o in sets), []), "--set", "optim.fake_lr=1.0", "--resume"]) == 2
    assert "optim.fake_lr" in capsys.readouterr().err


def test_prompt_stream_position_is_exact():
    a = PromptStream(list("ABCDE"), 3)
    first = a.next(4) + a.next(4)
    b = PromptStream(list("ABCDE"), 3)
    b.next(4)
    c = PromptStream(list("ABCDE"), 3)
    c.load(b.state())
    assert b.next(4) == c.next(4) == first[4:]
    assert sorted(first[:5]) == list("ABCDE")  # one epoch is a permutation
