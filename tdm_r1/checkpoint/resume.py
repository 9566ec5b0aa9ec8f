"""Resuming a run exactly: its progress (step, data position, random streams), the training state that holds it with
the roles and optimizers, and the checks that a state belongs to this run (command, teacher, config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tdm_r1 import checkpoint as ckpt
from tdm_r1.config import Config, to_dict
from tdm_r1.roles import Roles
from tdm_r1.worlds.stream import PromptStream


@dataclass
class Progress:
    """Everything besides roles and optimizers that a resumed run needs to continue exactly."""

    step: int
    stream: PromptStream
    gen: torch.Generator  # rollout noise, tau, step indices


def capture_state(progress: Progress, roles: Roles, opts: dict) -> dict:
    return {
        "step": progress.step,
        "data": progress.stream.state(),
        "roles": roles.state_tensors(),
        "optim": {k: o.state_dict() for k, o in opts.items()},
        "rng": ckpt.rng_state({"train": progress.gen}, {}),
    }


def restore_state(state: dict, progress: Progress, roles: Roles, opts: dict) -> None:
    roles.load_state_tensors(state["roles"])
    if set(state["optim"]) != set(opts):
        raise ckpt.CheckpointError(f"checkpoint optimizers {sorted(state['optim'])} != this run's {sorted(opts)}")
    for k, o in opts.items():
        o.load_state_dict(state["optim"][k])
    restore_progress(state, progress)


def restore_progress(state: dict, progress: Progress) -> None:
    """Step, data position and RNG streams of a training state."""
    ckpt.set_rng_state(state["rng"], {"train": progress.gen}, {})
    progress.stream.load(state["data"])
    progress.step = int(state["step"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def check_resume_config(saved: dict, current: dict, path: Path, resumable: tuple[str, ...]) -> None:
    """The saved config differs from the current one only in keys `resumable` names (a trailing '.': a section)."""
    allowed = lambda k: any(k == p or (p.endswith(".") and k.startswith(p)) for p in resumable)
    a, b = _flat(saved), _flat(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not allowed(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ckpt.CheckpointError(
            f"{path}: the config differs from the checkpoint's in keys that change training: {shown}"
        )


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """'auto' -> the newest training state of run_dir (no silent fallback to an older one)."""
    if resume != "auto":
        return Path(resume)
    states = ckpt.list_train_states(run_dir)
    if not states:
        raise ckpt.CheckpointError(f"--resume: no training-state checkpoint under {run_dir / 'checkpoints'}")
    return states[-1]


def load_resume(
    path: Path,
    cfg: Config,
    progress: Progress,
    roles: Roles,
    opts: dict,
    teacher_sha: str,
    *,
    command: str,
    resumable: tuple[str, ...],
) -> None:
    try:
        state, info = ckpt.read_train_state(path)
    except ckpt.CheckpointError as e:
        older = [p for p in sorted(path.parent.glob(ckpt.STATE_GLOB)) if p != path]
        hint = f"; the previous checkpoint {older[-1]} is intact: --resume {older[-1]}" if older else ""
        raise ckpt.CheckpointError(f"{e}{hint}") from e
    check_resume_info(path, info, cfg, teacher_sha, command, resumable)
    try:
        restore_state(state, progress, roles, opts)
    except (KeyError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: does not match this run's roles/optimizers: {e}") from e


def check_resume_info(
    path: Path, info: dict, cfg: Config, teacher_sha: str, command: str, resumable: tuple[str, ...]
) -> None:
    """The checkpoint was written by `command` against this teacher with a config that differs only in `resumable`."""
    if info.get("command") != command:
        raise ckpt.CheckpointError(f"{path} was written by {info.get('command')!r}, not by {command}")
    if info.get("teacher_sha256") != teacher_sha:
        raise ckpt.CheckpointError(f"{path} was trained against a different teacher than {cfg.roles.teacher}")
    check_resume_config(info["config"], to_dict(cfg), path, resumable)


def truncate_log(path: Path, step: int, key: str = "step") -> None:
    """Drop records logged after the resumed step (a run stopped after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get(key, 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
