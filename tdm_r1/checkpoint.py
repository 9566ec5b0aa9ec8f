"""Checkpoints: atomic safetensors files whose metadata carries the config needed to rebuild the model.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target, so a
crash never leaves a half-written checkpoint under the final name and the previous one survives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tdm_r1.config import ModelConfig, WorldConfig, from_dict, to_dict

MODEL_FORMAT = "tdm_r1.model/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not one of ours."""


def atomic_write(path: str | Path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync it, and rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(
    path: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, world_cfg: WorldConfig, **info
) -> None:
    """Save model weights with the model and world config in the safetensors metadata."""
    meta = {
        "format": MODEL_FORMAT,
        "model": json.dumps(to_dict(model_cfg)),
        "world": json.dumps(to_dict(world_cfg)),
        "info": json.dumps(info),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, WorldConfig, dict]:
    """Load a model checkpoint; refuse truncated or foreign files with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MODEL_FORMAT:
                raise CheckpointError(
                    f"{p} is not a tdm-r1 model checkpoint (format {meta.get('format')!r}, expected {MODEL_FORMAT!r})"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    model_cfg = from_dict(json.loads(meta["model"]), ModelConfig)
    world_cfg = from_dict(json.loads(meta["world"]), WorldConfig)
    return state, model_cfg, world_cfg, json.loads(meta.get("info", "{}"))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, world_cfg, info)."""
    from tdm_r1.models.tiny_dit import build_tiny_dit

    state, model_cfg, world_cfg, info = read_model(path)
    model = build_tiny_dit(model_cfg, world_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device).eval(), world_cfg, info
