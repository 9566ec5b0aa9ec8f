"""Resuming a run exactly: its progress (step, data position, random streams), the training state that holds it with
the roles and optimizers, and the checks that a state belongs to this run (command, teacher, config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tdm_r1 import checkpoint as ckpt
from tdm_r1.config import Config, from_dict, to_dict
from tdm_r1.distributed import LOCAL, Dist
from tdm_r1.optim import check_finite
from tdm_r1.roles import Roles
from tdm_r1.worlds.stream import PromptStream

# Config keys that may change between a run and its resumption, per command: they do not change the trajectory of the
# training state, only how long the run goes on and what it writes.
RESUMABLE_CHANGES = {
    "train": (
        "run_dir",
        "threads",
        "train.epochs",
        "train.eval_every",
        "train.eval_baselines",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.tensorboard",
        "train.max_reward_failure",
        "train.rewards.*.options.threads",
        "eval.",
        "distributed.",
        "perf.",
    ),
    "distill": (
        "run_dir",
        "threads",
        "distill.steps",
        "distill.eval_every",
        "distill.eval_at_end",
        "distill.checkpoint_every",
        "distill.keep_checkpoints",
        "eval.",
        "train.rewards",
        "distributed.",
        "perf.",
    ),
}
RESUMABLE_CHANGES["pretrain"] = ("run_dir", "threads", "pretrain.steps", "pretrain.log_every", "pretrain.save_every")
# The progress counter a command's states and logs are keyed by.
STEP_KEY = {"train": "epoch", "distill": "step", "pretrain": "step"}


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


def _flat(d: dict | list, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items() if isinstance(d, dict) else enumerate(d):
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, (dict, list)) else {key: v}  # an empty one adds no key
    return out


def check_resume_config(saved: dict, current: dict, path: Path, resumable: tuple[str, ...]) -> None:
    """The saved config (in today's keys: `config.migrate`) differs from the current one only in keys `resumable`
    names (a trailing '.': a section; '*': any one key, e.g. a list index; a name alone also covers what is below)."""
    import fnmatch

    def allowed(k: str) -> bool:
        return any(
            fnmatch.fnmatchcase(k, p + "*" if p.endswith(".") else p) or k.startswith(p + ".") for p in resumable
        )

    a, b = _flat(to_dict(from_dict(saved))), _flat(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not allowed(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ckpt.CheckpointError(
            f"{path}: the config differs from the checkpoint's in keys that change training: {shown}"
        )


def resume_from(resume: str, run_dir: Path, load, dist: Dist = LOCAL) -> Path:
    """Resume with `load(path)` from the state `resume` names, or with 'auto' from the newest state of run_dir that
    verifies: a state that cannot be read back as written (CorruptStateError) is skipped, saying which and why. A
    distributed run does not fall back (its ranks would have to agree): it stops naming the state. Returns the path
    loaded."""
    if resume != "auto":
        path = Path(resume)
        try:
            load(path)
        except ckpt.CorruptStateError as e:
            raise ckpt.CorruptStateError(f"{e}{_verified_hint(path)}") from e
        return path
    states = ckpt.list_train_states(run_dir)
    if not states:
        raise ckpt.CheckpointError(f"--resume: no training-state checkpoint under {run_dir / 'checkpoints'}")
    skipped = []
    for path in reversed(states):
        try:
            load(path)
        except ckpt.CorruptStateError as e:
            if dist.deepspeed:
                raise
            skipped.append(path.name)
            print(f"resume: skipped {path}: {e}")
            continue
        if skipped:
            print(f"resume: {path.name} is the newest state that verifies (skipped {', '.join(skipped)})")
        return path
    raise ckpt.CorruptStateError(f"--resume: no training state under {run_dir / 'checkpoints'} verifies")


def _verified_hint(path: Path) -> str:
    """'; the previous state X verifies: --resume X' when an older state of the same run reads back as written."""
    for older in reversed([p for p in ckpt.list_train_states(path.parent.parent) if p.name < path.name]):
        try:
            ckpt.read_train_state(ckpt.rank_file(older, 0) if ckpt.is_sharded(older) else older)
        except ckpt.CheckpointError:
            continue
        return f"; the previous state {older} verifies: --resume {older}"
    return ""


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
    state, info = ckpt.read_train_state(path)  # CorruptStateError: the caller may fall back to an older state
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
    """Drop records logged after the resumed step (a run stopped after its last checkpoint), and a torn last line;
    the lines kept are kept byte for byte."""
    if not path.is_file():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    records = read_log(path)  # a torn last line is the one record fewer
    keep = [ln for ln, r in zip(lines, records) if r.get(key, 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def read_log(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a write cut short by a crash) is dropped, any other bad line
    is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i < len(lines):
                raise ckpt.CheckpointError(f"{path}:{i}: not a JSON record ({e}); the log is damaged") from e
    return records


# -- one save / resume path for single-process and sharded (ZeRO) runs -----------------------------------------


def save_run_state(
    cfg: Config, progress: Progress, roles: Roles, opts: dict, teacher_sha: str, command: str, dist: Dist = LOCAL
) -> Path:
    """One training state of `command` ("train" / "distill"): a file, or in a distributed run a directory of per-rank
    files (collective); then all but the newest `keep_checkpoints` are pruned. Non-finite weights are never written
    (NonFiniteError: the previous state stays the newest)."""
    check_finite(roles, f"{command}: training state at {STEP_KEY[command]} {progress.step}", dist)
    info = {"command": command, "config": to_dict(cfg), "teacher_sha256": teacher_sha, STEP_KEY[command]: progress.step}
    if dist.deepspeed:
        from tdm_r1.checkpoint.sharded import save_sharded_state

        state = {"step": progress.step, "data": progress.stream.state()}
        state["rng"] = ckpt.rng_state({"train": progress.gen}, {})
        path = save_sharded_state(ckpt.sharded_state_path(cfg.run_dir, progress.step), dist, roles, opts, state, info)
    else:
        path = ckpt.state_path(cfg.run_dir, progress.step)
        ckpt.save_train_state(path, capture_state(progress, roles, opts), info)
    if dist.is_main:
        ckpt.prune_train_states(cfg.run_dir, getattr(cfg, command).keep_checkpoints)
    return path


def resume_run_state(
    path: Path, cfg: Config, progress: Progress, roles: Roles, opts: dict, teacher_sha: str, command: str, dist: Dist
) -> None:
    """Load a training state of `command` into this run (the same kind of run: single-process, or distributed on as
    many ranks), after checking it belongs to it."""
    resumable = RESUMABLE_CHANGES[command]
    if ckpt.is_sharded(path) != dist.deepspeed:
        raise ckpt.CheckpointError(
            f"{path} was written by a {'distributed' if ckpt.is_sharded(path) else 'single-process'} run; resume it "
            "the same way (a distributed state on as many ranks), or `tdm-r1 export` a role from it"
        )
    if not dist.deepspeed:
        load_resume(path, cfg, progress, roles, opts, teacher_sha, command=command, resumable=resumable)
        return
    from tdm_r1.checkpoint.sharded import load_sharded_state

    state, info = load_sharded_state(path, dist, roles, opts)
    check_resume_info(path, info, cfg, teacher_sha, command, resumable)
    restore_progress(state, progress)
