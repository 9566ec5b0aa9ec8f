"""Exports: a run's result (the EMA generator after `train`, the student and its fake score after `distill`), and one
role of a training state as a model checkpoint that `tdm-r1 eval` loads (`tdm-r1 export`).

A training state is one file (single-process run) or a directory with one file per rank (distributed run); the
ranks' ZeRO-3 partitions are stitched back together here, without DeepSpeed or a launcher. A role's weights are the
model it runs: full mode, its own module's parameters; lora mode, the teacher with the role's adapter merged in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tdm_r1 import checkpoint as ckpt
from tdm_r1.checkpoint.pipeline import export_diffusers_pipeline
from tdm_r1.checkpoint.sources import file_sha256, folder_fingerprint, load_teacher, teacher_source
from tdm_r1.config import Config, RolesConfig, from_dict, is_diffusers
from tdm_r1.distributed import LOCAL, Dist, full_state, gathered, is_partitioned
from tdm_r1.optim import check_finite
from tdm_r1.roles import Roles, build_roles

ROLES = ("generator_ema", "generator", "fake", "surrogate", "slow_surrogate")


def _merged(roles_cfg: RolesConfig, teacher: nn.Module, adapter: dict[str, Tensor]) -> dict[str, Tensor]:
    """The teacher with one adapter merged (Roles.export on a fresh, undistributed host carrying only it)."""
    return build_roles(roles_cfg, teacher, surrogate=False, fake=False, generator_init=adapter).export("generator_ema")


def role_weights(roles: Roles, role: str, teacher: nn.Module, roles_cfg: RolesConfig) -> dict[str, Tensor]:
    """Plain weights of one role, on every rank. Collective when the roles are ZeRO-3 partitioned: each tensor is
    gathered in turn, so no rank holds more than one role whole."""
    r = getattr(roles, role)
    if not any(is_partitioned(p) for p in r.parameters()):
        return roles.export(role)
    if roles.mode == "full":
        params = full_state(r.module.named_parameters())
        return {k: params[k] if k in params else v.detach().cpu().clone() for k, v in r.module.state_dict().items()}
    with gathered(r.parameters()):
        adapter = roles.adapter_tensors(role)
    return _merged(roles_cfg, teacher, adapter)


def role_tensors(roles: Roles, role: str) -> dict[str, Tensor]:
    """The tensors that define one role, on every rank: lora mode its adapter tensors (keys without the adapter
    name), full mode its module's weights. Collective when partitioned (gathered one role at a time)."""
    if roles.mode == "full":
        return role_weights(roles, role, None, None)
    with gathered(getattr(roles, role).parameters()):
        return roles.adapter_tensors(role)


def read_role_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Every role tensor (`<role>/<name>`, whole) of a training state, and its info."""
    path = Path(path)
    if ckpt.is_sharded(path):
        return ckpt.read_sharded_roles(path)
    state, info = ckpt.read_train_state(path)
    return state["roles"], info


def export_checkpoint(
    path: str | Path, role: str, out: str | Path, lora: str = "merge", overwrite: bool = False
) -> Path:
    """Write `role` of the training state at `path` (a run directory: its newest state) as a model checkpoint, or for
    a diffusers model (model.kind sd3 / zimage) as a diffusers pipeline folder (`export_pipeline`). An existing
    output is refused unless `overwrite`."""
    path = Path(path)
    if path.is_dir() and not ckpt.is_sharded(path):
        states = ckpt.list_train_states(path)
        if not states:
            raise ckpt.CheckpointError(f"no training-state checkpoint under {path / 'checkpoints'}")
        path = states[-1]
    tensors, info = read_role_tensors(path)
    cfg: Config = from_dict(info["config"])
    prefix = f"{role}/"
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        have = sorted({k.split("/")[0] for k in tensors})
        raise ckpt.CheckpointError(f"{path} has no role {role!r}; it has {', '.join(have)}")
    if is_diffusers(cfg):
        return export_pipeline(cfg, info, path, role, own, out, lora, overwrite)
    if Path(out).is_dir():
        raise ckpt.CheckpointError(f"--out {out} is a folder; a toy model exports to a .safetensors file")
    if Path(out).exists() and not overwrite:
        raise ckpt.CheckpointError(f"--out {out} exists; choose another path or pass --overwrite")
    if cfg.roles.mode == "full":
        weights = own
    else:
        if file_sha256(cfg.roles.teacher) != info.get("teacher_sha256"):
            raise ckpt.CheckpointError(f"{path} was trained against a different teacher than {cfg.roles.teacher}")
        adapter = {k.replace(f".{role}.", "."): v for k, v in own.items()}
        with torch.no_grad():
            weights = _merged(cfg.roles, load_teacher(cfg), adapter)
    meta = {"kind": "export", "role": role, "source": str(path), "epoch": info.get("epoch", info.get("step"))}
    meta |= {"nfe": cfg.tdm.steps, "shift": cfg.tdm.shift, "teacher": cfg.roles.teacher, "roles_mode": cfg.roles.mode}
    ckpt.save_model(out, weights, cfg.model, cfg.world, **meta)
    return Path(out)


def export_pipeline(
    cfg: Config,
    info: dict,
    path: Path,
    role: str,
    own: dict[str, Tensor],
    out: str | Path,
    lora: str = "merge",
    overwrite: bool = False,
) -> Path:
    """A role of a diffusers run as a standalone diffusers pipeline folder: the run's source folder (diffusers.path,
    which must be the one it was trained against) with the role's transformer; in lora mode the adapter merged into
    it (lora="merge") or kept beside it as pytorch_lora_weights.safetensors (lora="adapter")."""
    from tdm_r1.checkpoint.pipeline import folder_ref, transformer_parameter_names
    from tdm_r1.models.diffusers_common import DTYPES

    if lora not in ("merge", "adapter"):
        raise ValueError(f"lora must be 'merge' or 'adapter', got {lora!r}")
    if folder_fingerprint(cfg.diffusers.path) != info.get("teacher_sha256"):
        raise ckpt.CheckpointError(
            f"{path} was trained against another model than the one now at diffusers.path={cfg.diffusers.path!r}"
        )
    model = folder_ref(cfg.diffusers.path, DTYPES[cfg.diffusers.dtype])  # the weights are streamed, never loaded
    if cfg.roles.mode == "lora":
        tensors = {k.replace(f".{role}.", "."): v for k, v in own.items()}
    else:  # role tensors are parameters only: buffers come from the source transformer
        tensors = {k.removeprefix("transformer."): v for k, v in own.items()}
        missing = sorted(transformer_parameter_names(cfg.diffusers.path) - set(tensors))
        if missing:
            raise ckpt.CheckpointError(f"{path}: role {role} lacks transformer parameters {missing[:4]}")
    return export_diffusers_pipeline(
        model,
        tensors,
        out,
        merge_lora=lora == "merge",
        lora_alpha=cfg.roles.lora_alpha,
        steps=cfg.tdm.steps,
        shift=cfg.tdm.shift,
        overwrite=overwrite,
    )


# -- a run's results -------------------------------------------------------------------------------------


def export_generator(
    cfg: Config, roles: Roles, teacher, epoch: int, minutes: float, dist: Dist = LOCAL, name: str = "generator"
) -> Path:
    """`train`'s result: <name>.safetensors from the EMA generator, or for a diffusers model the pipeline folder
    (`export_run_pipeline`; `name` "generator" -> pipeline/, else pipeline_<suffix>/). Collective when the roles are
    partitioned (gathered first)."""
    info = {
        "kind": "tdm_r1",
        "epoch": epoch,
        "nfe": cfg.tdm.steps,
        "shift": cfg.tdm.shift,
        "minutes": minutes,
        "teacher": cfg.roles.teacher,
        "generator_init": cfg.roles.generator_init,
    }
    check_finite(roles, "train: export", dist)
    if is_diffusers(cfg):
        folder = "pipeline" if name == "generator" else "pipeline" + name.removeprefix("generator")
        return export_run_pipeline(cfg, roles, dist, folder)
    out = Path(cfg.run_dir) / f"{name}.safetensors"
    weights = role_weights(roles, "generator_ema", teacher, cfg.roles)
    if dist.is_main:
        ckpt.save_model(out, weights, cfg.model, cfg.world, **info)
    return out


def export_run_pipeline(
    cfg: Config, roles: Roles, dist: Dist = LOCAL, folder: str = "pipeline", role: str = "generator_ema"
) -> Path:
    """<run_dir>/<folder>: one role (the EMA generator) as a diffusers pipeline folder (LoRA merged; the unchanged
    text encoders, tokenizers and VAE symlinked to diffusers.path: `tdm-r1 export` writes a standalone copy).
    Collective when the roles are partitioned (each tensor is gathered in turn)."""
    tensors = role_tensors(roles, role)
    out = Path(cfg.run_dir) / folder
    if dist.is_main:
        base = roles.host.model if roles.host is not None else roles.reference.module
        export_diffusers_pipeline(
            base,
            tensors,
            out,
            merge_lora=True,
            lora_alpha=cfg.roles.lora_alpha,
            steps=cfg.tdm.steps,
            shift=cfg.tdm.shift,
            overwrite=True,
            link_unchanged=True,
        )
    return out


def export_student(cfg: Config, roles: Roles, step: int, minutes: float, dist: Dist = LOCAL) -> Path:
    """`distill`'s result. Toy model: student.safetensors (the EMA generator) and its fake score (for TDM-R1's
    roles.fake_init). Diffusers model: the pipeline folder student_pipeline/ (the EMA generator, LoRA merged: what
    `tdm-r1 eval` / `sample` and a full-mode roles.generator_init load) and, in full mode, student_fake_pipeline/.
    In lora mode both adapters too (student_adapter.safetensors, student_fake_adapter.safetensors: roles.generator_init
    / fake_init). Collective when the roles are partitioned; rank 0 writes."""
    check_finite(roles, "distill: export", dist)
    run = Path(cfg.run_dir)
    info = {"kind": "student", "step": step, "nfe": cfg.tdm.steps, "shift": cfg.tdm.shift, "minutes": minutes}
    info |= {"teacher": teacher_source(cfg), "roles_mode": cfg.roles.mode}
    fake_info = info | {"kind": "student_fake"}
    if cfg.roles.mode == "lora":
        adapters = {name: role_tensors(roles, role) for name, role in (("student", "generator_ema"), ("fake", "fake"))}
        if dist.is_main:
            ckpt.save_adapter(run / "student_adapter.safetensors", adapters["student"], cfg, **info)
            ckpt.save_adapter(run / "student_fake_adapter.safetensors", adapters["fake"], cfg, **fake_info)
    if is_diffusers(cfg):
        out = export_run_pipeline(cfg, roles, dist, "student_pipeline")
        if cfg.roles.mode == "full":
            export_run_pipeline(cfg, roles, dist, "student_fake_pipeline", role="fake")
        return out
    out = run / "student.safetensors"
    teacher = load_teacher(cfg) if any(is_partitioned(p) for p in roles.generator_ema.parameters()) else None
    weights = role_weights(roles, "generator_ema", teacher, cfg.roles)
    if dist.is_main:
        ckpt.save_model(out, weights, cfg.model, cfg.world, **info)
    if cfg.roles.mode == "full":
        fake = role_weights(roles, "fake", None, cfg.roles)
        if dist.is_main:
            ckpt.save_model(run / "student_fake.safetensors", fake, cfg.model, cfg.world, **fake_info)
    return out
