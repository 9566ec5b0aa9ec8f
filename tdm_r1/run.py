"""What a run is built from, in one place for the commands, tools, benchmarks and tests: `build_run(cfg)` gives the
world, the teacher and its identity, the roles and their optimizers (DeepSpeed engines under a distributed launch),
the run's progress (data stream and random stream) and this rank's share of an epoch; plus the run directory's
lifecycle (archiving an earlier run's outputs, the seconds already logged by a resumed run).

model.kind tiny_dit reads `world:` and the `roles.teacher` checkpoint; sd3 / zimage read `prompts:` and the local
diffusers folder `diffusers.path`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tdm_r1 import distributed
from tdm_r1.checkpoint import sources
from tdm_r1.checkpoint.resume import Progress, read_log
from tdm_r1.config import Config, ConfigError, is_diffusers
from tdm_r1.config.validate import validate
from tdm_r1.distributed import LOCAL, Dist, Split
from tdm_r1.distributed.engines import wrap_roles
from tdm_r1.optim import build_optimizers
from tdm_r1.roles import Roles, build_roles
from tdm_r1.worlds.base import World
from tdm_r1.worlds.stream import PromptStream
from tdm_r1_kernels import dispatch


@dataclass
class Run:
    cfg: Config
    dist: Dist
    split: Split  # this rank's rows of each epoch's P x G samples (train) or of each step's batch (distill)
    world: World
    teacher: nn.Module | None  # the toy teacher (None for diffusers models: every role holds its own copy)
    teacher_sha: str  # the teacher's identity, stored in training states
    roles: Roles
    opts: dict  # per-role optimizers, or DeepSpeed engines
    progress: Progress

    @property
    def path(self) -> Path:
        return Path(self.cfg.run_dir)

    def kernels(self):
        """A context in which the fused ops run on perf.kernels (auto: the usual per-device choice)."""
        return dispatch.using(None if self.cfg.perf.kernels == "auto" else self.cfg.perf.kernels)


def build_world(cfg: Config, need_text: bool = False) -> World:
    """The toy world `world.name` names, or the prompt world of a diffusers model (need_text: prompts must quote their
    text)."""
    if is_diffusers(cfg):
        from tdm_r1.worlds.prompts import build_prompt_world

        return build_prompt_world(cfg.prompts, cfg.diffusers, need_text)
    from tdm_r1 import worlds

    return worlds.build_world(cfg.world)


def build_run(cfg: Config, command: str = "train", dist: Dist | None = None) -> Run:
    """Everything `command` ("train": generator, fake score, surrogate, slow surrogate; "distill": generator and fake
    score) trains with, seeded by cfg.seed. `dist` defaults to the launch's (`distributed.init`: one process unless
    started by `deepspeed` / `torchrun`)."""
    validate(cfg, command)
    dist = dist or distributed.init(cfg.distributed, cfg.optim)
    split = run_split(cfg, command, dist)
    torch.manual_seed(cfg.seed)
    world = build_world(cfg, need_text=command == "train" and any(r.name == "ocr" for r in cfg.train.rewards))
    check_prompt_lengths(cfg, world)
    teacher = sources.load_run_teacher(cfg)
    teacher_sha = sources.teacher_id(cfg)
    generator_init = sources.load_run_generator_init(cfg, teacher)
    roles = build_roles(
        cfg.roles,
        teacher,
        surrogate=command == "train",
        fake=True,
        generator_init=generator_init,
        place=dist.place,
        fake_init=sources.load_run_generator_init(cfg, teacher, field="fake_init") if command == "train" else None,
    )
    if is_diffusers(cfg):  # every role holds its own copy (or the shared base); export reads only the folder
        teacher = None
    for role in roles.active().values():
        role.separate_cfg = cfg.perf.cfg_batching == "separate"
        role.merged_no_grad = cfg.perf.lora_forward == "merged" and not dist.deepspeed
    opts = wrap_roles(roles, cfg.optim, dist) if dist.deepspeed else build_optimizers(roles, cfg.optim)
    progress = Progress(0, PromptStream(world.items("train"), cfg.seed), torch.Generator().manual_seed(cfg.seed))
    return Run(cfg, dist, split, world, teacher, teacher_sha, roles, opts, progress)


def run_split(cfg: Config, command: str, dist: Dist) -> Split:
    """This rank's rows: of each epoch's P x G samples (train), of each step's distill.batch_size rollouts (distill:
    one micro-batch, the random draws made for all of it)."""
    if command == "train":
        return distributed.epoch_split(cfg.train, dist, cfg.distributed.micro_batch_per_gpu)
    n = cfg.distill.batch_size
    if n % dist.world:
        raise ConfigError(f"distill.batch_size={n} does not split over {dist.world} ranks: make it a multiple")
    if dist.deepspeed and cfg.roles.mode == "lora" and cfg.distill.fake_updates > 1:
        raise ConfigError(
            "distill.fake_updates > 1 with roles.mode lora under DeepSpeed: the generator and fake adapters share one "
            "engine, whose fake-only steps would also move the generator; use distill.fake_updates: 1"
        )
    return Split(n, n, 1, dist.rank, dist.world)


def check_prompt_lengths(cfg: Config, world: World) -> None:
    """The toy model reads at most model.text_len characters of a prompt: a longer one is a ConfigError now, not a
    traceback in the middle of an epoch."""
    if is_diffusers(cfg):
        return
    for split in ("train", "heldout"):
        for item in world.items(split):
            prompt = world.prompt(item)
            if len(prompt) > cfg.model.text_len:
                raise ConfigError(
                    f"{split} item {item[:40]!r}: its prompt has {len(prompt)} characters, more than "
                    f"model.text_len={cfg.model.text_len} (shorten the item or world.prompt_template)"
                )


def trainable_counts(roles: Roles) -> dict[str, int]:
    """Trainable parameters per role (whole counts, also when ZeRO-3 partitions them)."""
    return {k: sum(getattr(p, "ds_numel", p.numel()) for p in v) for k, v in roles.trainable().items()}


# -- the run directory ---------------------------------------------------------------------------------------

# What the commands write into run_dir (baselines.json is a cache keyed by what it measured and stays).
RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "report.md",
    "reward_curve.png",
    "samples_start.png",
    "samples_end.png",
    "samples_start.safetensors",
    "samples_start_end.png",
    "generator.safetensors",
    "pipeline",
    "student_pipeline",
    "student_fake_pipeline",
    "generator_best_gold.safetensors",
    "pipeline_best_gold",
    "student.safetensors",
    "student_fake.safetensors",
    "student_adapter.safetensors",
    "student_fake_adapter.safetensors",
    "eval_student.json",
    "eval_student.png",
    "teacher.safetensors",
    "checkpoints",
    "tensorboard",
    "config.yaml",
)
LOCK_FILE = ".lock"


class RunStopped(Exception):
    """A run stopped on SIGINT / SIGTERM after writing a training state; the message says how to resume."""


class StopRequests:
    """While active, SIGINT and SIGTERM ask the run to stop at the next boundary (an epoch or a step) instead of
    killing it; a second signal aborts at once. `requested(dist)` agrees across ranks."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after the current step, then writing a state (again to abort)", flush=True)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, dist: Dist = LOCAL) -> bool:
        flag = torch.tensor(float(self.signal is not None))
        return float(dist.all_reduce_sum(flag)) > 0


class RunDirBusyError(ConfigError):
    """Another live process holds the run directory."""


@contextlib.contextmanager
def run_dir_lock(run: str | Path, holder: bool = True) -> Iterator[None]:
    """Hold run_dir exclusively while the block runs (holder=False: a rank that is not rank 0 takes no lock). The lock
    is an flock on run_dir/.lock, released by the kernel when the process dies, so a dead run's lock never blocks; the
    file names the holder (pid, host, start) for the error another process gets."""
    if not holder:
        yield
        return
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"{run} is in use by {_holder(path)}; wait for it to finish or choose another run_dir"
            raise RunDirBusyError(busy) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def open_run_dir(run: str | Path, fresh: bool, command: str) -> Path | None:
    """With the lock held: remove what interrupted writes left (temporary files), and for a fresh (not resumed) run
    archive an earlier run's outputs. Returns the archive directory, if one was made."""
    run = Path(run)
    for tmp in [*run.glob(".*.tmp-*"), *run.glob("checkpoints/.*.tmp-*"), *run.glob("checkpoints/*.tmp")]:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        print(f"{command}: removed {tmp}, left by an interrupted write")
    return archive_previous_run(run) if fresh else None


def archive_previous_run(run: str | Path) -> Path | None:
    """A fresh (not resumed) run in a directory that holds an earlier run's outputs: move them into
    run_dir/previous_<n>/ so nothing written is lost and the new metrics, curve and checkpoints are not mixed with
    the old ones. Returns the archive directory, or None when there was nothing to move."""
    run = Path(run)
    found = [run / name for name in RUN_OUTPUTS if (run / name).exists()]
    if not any(p.name in ("metrics.jsonl", "checkpoints") for p in found):
        return None
    n = 1
    while (run / f"previous_{n}").exists():
        n += 1
    dest = run / f"previous_{n}"
    dest.mkdir()
    for p in found:
        p.rename(dest / p.name)
    return dest


def logged_seconds(path: str | Path) -> float:
    """Seconds of the epochs in a run's metrics.jsonl (rollout + update + eval phases of each record)."""
    keys = ("sec_rollout_reward", "sec_update", "sec_eval")
    return sum(r.get(k, 0.0) for r in read_log(path) for k in keys)
