"""Rollout (no grad) and training (grad) run the same fused sampler step (DESIGN section 6), so the generator's step
inside the training losses reproduces the rollout's stored next state bit for bit, for `tdm-r1 train` and
`tdm-r1 distill`, on the backend a run picks by itself (native when `make native` built it) and on the reference,
when both forwards go through peft (perf.lora_forward=peft). With merged no-grad forwards (the default) the rollout's
output is W + sBA applied at once, the training forward's W x + s B (A x): equal up to rounding, bounded below.

The training step is observed where the trainer calls `fused_sampler_step`: its x_next is recomputed from the
generator's output with grad, not read from the trajectory, so equality is a property of the kernels, not a copy.
"""

import pytest
import torch
from utils import TINY, save_tiny_teacher

from tdm_r1 import phases, updates
from tdm_r1.config import load_config
from tdm_r1.distributed import Split
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.scorer import RewardScorer
from tdm_r1.run import build_run
from tdm_r1.worlds.stream import PromptStream
from tdm_r1_kernels import dispatch

RUN = [
    "train.prompts_per_epoch=2",
    "train.group_size=3",
    "train.micro_batch_groups=1",
    "train.rewards=[{name: dark_fraction, weight: 1.0}]",
    "distill.batch_size=3",
]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_tiny_teacher(path)
    return path


@pytest.fixture(params=["dispatch", "reference"])
def backend(request, monkeypatch):
    """The CPU backend the run chooses by itself, and the reference forced through TDM_R1_KERNELS."""
    if request.param == "reference":
        monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    else:
        monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    dispatch.reset()
    yield dispatch.resolve_backend(torch.device("cpu"))
    dispatch.reset()


class StepSpy:
    """Wraps fused_sampler_step and records (x, v, grad enabled, result) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, v, *args, **kwargs):
        out = self.fn(x, v, *args, **kwargs)
        self.calls.append((x, v, torch.is_grad_enabled(), out))
        return out


@pytest.fixture(params=["peft", "merged"])
def lora_forward(request):
    return request.param


# Merged against peft forwards of the TINY model with perturbed adapters: max |dv| / max |v| measured up to 2.6e-7
# (5 seeds, AVX2 and ATEN_CPU_CAPABILITY=default); the bound leaves 19x.
MERGED_RTOL = 5e-6


def _close(a, b) -> bool:
    return float((a - b).abs().max()) <= MERGED_RTOL * float(b.abs().max())


def _perturb_adapters(roles) -> None:
    """Adapters away from their zero start (B = 0 makes any order of the sum exact)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for params in roles.trainable().values():
            for p in params:
                p.add_(torch.randn_like(p) * 0.05)


def _check_step(call, traj, j, grad: bool, exact: bool = True) -> int:
    """Assert the recorded step at index j reproduces traj.xs[j + 1] bitwise (exact) or to MERGED_RTOL; return how
    many elements of the same Euler step evaluated in another (mathematically equal) order differ from it."""
    x, v, grad_enabled, step = call
    assert torch.equal(x, traj.xs[j])
    same = torch.equal if exact or not grad else _close
    assert same(v.detach(), traj.v[j]), "the generator's output with grad differs from the rollout's"
    assert grad_enabled == grad and v.requires_grad == grad and step.x0_hat.requires_grad == grad
    assert not torch.equal(step.x_next, x)  # the state moved
    assert same(step.x_next.detach(), traj.xs[j + 1]), f"step {j}: x_next differs from the stored state"
    if not exact and grad:
        assert not torch.equal(v.detach(), traj.v[j]), "merged and peft forwards agree bitwise: the check is vacuous"
    s_next = float(traj.s[j + 1])
    if s_next == 0.0:
        return 0
    reordered = step.x0_hat.detach() + s_next * v.detach()  # x - (s - s') v = x0_hat + s' v, rounded differently
    return int((reordered != traj.xs[j + 1]).sum())


def test_train_generator_step_with_grad_reproduces_the_rollout(
    backend, lora_forward, teacher_path, tmp_path, monkeypatch
):
    sets = [*TINY, *RUN, f"roles.teacher={teacher_path}", f"run_dir={tmp_path}", f"perf.lora_forward={lora_forward}"]
    run = build_run(load_config(None, sets))
    cfg, roles, world = run.cfg, run.roles, run.world
    _perturb_adapters(roles)
    scorer = RewardScorer([(build_reward("dark_fraction"), 1.0)])
    gen = torch.Generator().manual_seed(0)
    batch = phases.rollout_phase(roles, world, PromptStream(world.train_words, 0), scorer, cfg.train,
                                  cfg.tdm, gen)  # fmt: skip
    scorer.close()
    phases.advantage_phase(batch, cfg.train)
    spy = StepSpy(updates.fused_sampler_step)
    monkeypatch.setattr(updates, "fused_sampler_step", spy)
    reordered_differ = 0
    for mb in phases.micro_batches(batch):
        for j in range(cfg.tdm.steps):
            spy.calls.clear()
            updates.generator_backward(roles, mb, j, cfg.train, cfg.tdm, gen, 1.0)
            assert len(spy.calls) == 1
            reordered_differ += _check_step(spy.calls[0], mb.traj, j, grad=True, exact=lora_forward == "peft")
    # bitwise equality is not automatic: the same step in another order of operations rounds differently
    assert reordered_differ > 0
    grads = [p.grad for p in roles.trainable()["generator"]]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_distill_generator_and_fake_steps_reproduce_the_rollout(
    backend, lora_forward, teacher_path, tmp_path, monkeypatch
):
    sets = [*TINY, *RUN, f"roles.teacher={teacher_path}", f"run_dir={tmp_path}", f"perf.lora_forward={lora_forward}"]
    run = build_run(load_config(None, sets), "distill")
    cfg, roles, world = run.cfg, run.roles, run.world
    _perturb_adapters(roles)
    gen = torch.Generator().manual_seed(0)
    batch = phases._distill_rollout(roles, world, PromptStream(world.train_words, 0), Split(3, 3, 1), cfg.tdm, gen)
    cond, traj = batch.cond, batch.traj
    spy = StepSpy(updates.fused_sampler_step)
    monkeypatch.setattr(updates, "fused_sampler_step", spy)  # the generator and fake-score phases shared with train
    reordered_differ = 0
    for j in range(cfg.tdm.steps):
        spy.calls.clear()
        updates.generator_backward(roles, batch, j, None, cfg.tdm, gen, 1.0)
        updates.fake_score_backward(roles.fake, roles.reference, cond, traj, j, cfg.tdm, gen, 1.0)
        assert len(spy.calls) == 2
        reordered_differ += _check_step(spy.calls[0], traj, j, grad=True, exact=lora_forward == "peft")
        _check_step(spy.calls[1], traj, j, grad=False)  # the fake score's step from the stored output
    assert reordered_differ > 0
