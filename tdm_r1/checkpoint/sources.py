"""Where a run's models come from, for the toy model and diffusers models alike: the frozen teacher, the starting
generator (or fake score), and their identities by content (stored in training states, checked on resume and export;
keys of the baselines cache).

model.kind tiny_dit reads `world:` and the `roles.teacher` checkpoint; sd3 / zimage read `prompts:` and the local
diffusers folder `diffusers.path`, which is the teacher / reference (loaded in full before any partitioning: diffusers'
from_pretrained does not run under DeepSpeed's zero.Init).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from torch import nn

from tdm_r1 import checkpoint as ckpt
from tdm_r1.config import Config, ConfigError, is_diffusers, to_dict


def load_run_teacher(cfg: Config) -> nn.Module:
    """The frozen teacher: the tiny DiT checkpoint roles.teacher, or the diffusers folder's transformer (with its
    text encoders and VAE, shared by every role)."""
    if not is_diffusers(cfg):
        return load_teacher(cfg)
    from tdm_r1.models.load import load_diffusers_model

    return load_diffusers_model(cfg.model, cfg.diffusers).eval().requires_grad_(False)


def teacher_source(cfg: Config) -> str:
    """Where the teacher comes from, as the run records it."""
    return cfg.diffusers.path if is_diffusers(cfg) else cfg.roles.teacher


def folder_fingerprint(path: str | Path) -> str:
    """sha256 over a diffusers folder's model_index.json, transformer config and the names and sizes of its transformer
    weight files: cheap for multi-GB weights, and changes when the transformer is replaced."""
    root = Path(path)
    h = hashlib.sha256()
    for name in ("model_index.json", "transformer/config.json"):
        f = root / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"<missing>") + b"\0")
    files = sorted(p for p in (root / "transformer").rglob("*") if p.is_file())
    h.update(json.dumps([[str(p.relative_to(root)), p.stat().st_size] for p in files]).encode())
    return h.hexdigest()


def content_id(path: str | Path | None) -> str | None:
    """sha256 of a checkpoint file, the fingerprint of a diffusers folder, None for no path."""
    if path is None:
        return None
    if Path(path).is_dir():
        return folder_fingerprint(path)
    return file_sha256(path)


def teacher_id(cfg: Config) -> str:
    """The teacher's identity stored in training states: the checkpoint's sha256, or the folder fingerprint."""
    if is_diffusers(cfg):
        return f"random-init:{cfg.model.kind}" if cfg.diffusers.random_init else folder_fingerprint(cfg.diffusers.path)
    return file_sha256(cfg.roles.teacher)


def load_run_generator_init(cfg: Config, teacher: nn.Module, field: str = "generator_init"):
    """The few-step generator (field="generator_init") or fake score (field="fake_init") to start from (None = the
    teacher). lora mode: adapter tensors written by `tdm-r1 distill` / `train` (roles format, checked against
    roles.lora_*) or, on a diffusers model, a published LoRA (peft folder, diffusers or kohya file:
    tdm_r1.checkpoint.published_lora) mapped onto them. full mode: a model checkpoint (toy) or a diffusers folder whose
    `transformer/` is loaded into a copy of the teacher (e.g. a `tdm-r1 export` folder)."""
    path = getattr(cfg.roles, field)
    if path is None or not is_diffusers(cfg):
        return load_generator_init(cfg, field)
    if cfg.roles.mode == "lora":
        from tdm_r1.checkpoint.published_lora import read_lora_init

        return read_lora_init(path, cfg.roles, teacher)
    if not (Path(path) / "transformer").is_dir():
        raise ConfigError(
            f"roles.{field}={path!r}: full mode on model.kind {cfg.model.kind} starts the generator from a "
            "diffusers folder with a transformer/ subfolder (e.g. one written by `tdm-r1 export`)"
        )
    import torch

    generator = copy.deepcopy(teacher)
    dtype = next(teacher.transformer.parameters()).dtype
    loaded = type(teacher.transformer).from_pretrained(
        path, subfolder="transformer", dtype=dtype, local_files_only=True
    )
    with torch.no_grad():
        generator.transformer.load_state_dict(loaded.state_dict(), strict=True)
    return generator


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(cfg: Config):
    model, world_cfg, _ = ckpt.load_model(cfg.roles.teacher)
    if to_dict(model.cfg) != to_dict(cfg.model):
        raise ckpt.CheckpointError(f"{cfg.roles.teacher}: its model config differs from the run's model section")
    w = cfg.world
    if (world_cfg.height, world_cfg.width, world_cfg.channels) != (w.height, w.width, w.channels):
        raise ckpt.CheckpointError(f"{cfg.roles.teacher}: trained on {world_cfg.height}x{world_cfg.width} images")
    return model.requires_grad_(False)


def load_generator_init(cfg: Config, field: str = "generator_init"):
    """roles.generator_init (or roles.fake_init): adapter tensors in lora mode, a model in full mode, None."""
    path = getattr(cfg.roles, field)
    if path is None:
        return None
    if cfg.roles.mode == "full":
        return ckpt.load_model(path)[0]
    return ckpt.read_adapter(path, cfg.roles)
